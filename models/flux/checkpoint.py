"""Where a FLUX.1 DiT lives, in either release layout, and its config (read or inferred), without torch.

Original release (black-forest-labs/FLUX.1-dev, -schnell): `flux1-dev.safetensors` / `flux1-schnell.safetensors`
at the top of the folder (BFL key names, no config file; the config is inferred from the tensor shapes).
diffusers layout: `transformer/config.json` + `diffusion_pytorch_model*.safetensors` (sharded with an
`.index.json` or not). The released repositories hold both; the original file is taken when present.

Only small JSON (config.json, the safetensors header) is read here; the weights are loaded by
`FluxTransformer.from_pretrained`. No torch: the engine resolves checkpoints with this module.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from models import config_files
from models.errors import CheckpointError
from models.flux.config import FluxDiTConfig
from models.key_maps import strip_prefix

ORIGINAL_DIT_FILES = ("flux1-dev.safetensors", "flux1-schnell.safetensors")
DIFFUSERS_DIT_DIR = "transformer"
DIFFUSERS_CLASS = "FluxTransformer2DModel"
# The released RoPE split for head_dim 128; the original file does not record it.
RELEASE_AXES_DIMS_ROPE = (16, 56, 56)
_HEADER_LIMIT = 100 * 1024 * 1024

Layout = Literal["original", "diffusers"]


@dataclass(frozen=True)
class FluxDiTSource:
    """One FLUX.1 DiT checkpoint: its layout, the file (original) or folder (diffusers) and its config."""

    layout: Layout
    path: Path
    config: FluxDiTConfig


def read_safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header (8-byte little-endian length, then JSON); reads no weights."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > _HEADER_LIMIT:
                raise CheckpointError(f"{path}: safetensors header of {length} bytes is implausibly large")
            header = json.loads(f.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from exc
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _shape(shapes: dict[str, tuple[int, ...]], key: str, path: Path) -> tuple[int, ...]:
    try:
        return shapes[key]
    except KeyError:
        raise CheckpointError(f"{path} lacks {key}, which every FLUX.1 transformer has; it is not a FLUX.1 "
                              f"transformer in the original layout") from None


def infer_original_config(path: str | Path) -> FluxDiTConfig:
    """The config of an original (BFL-layout) FLUX.1 file, inferred from its tensor shapes.

    The RoPE split is not in the file: head_dim 128 gets the release's (16, 56, 56); any other head_dim needs an
    explicit config (`FluxTransformer.from_pretrained(..., config=...)`).
    """
    path = Path(path)
    shapes = {strip_prefix(k): v for k, v in read_safetensors_shapes(path).items()}
    hidden, in_channels = _shape(shapes, "img_in.weight", path)
    head_dim = _shape(shapes, "double_blocks.0.img_attn.norm.query_norm.scale", path)[0]
    mlp_hidden = _shape(shapes, "double_blocks.0.img_mlp.0.weight", path)[0]

    def count(kind: str) -> int:
        found = {int(m.group(1)) for k in shapes if (m := re.match(rf"{kind}\.(\d+)\.", k))}
        return max(found) + 1 if found else 0

    if head_dim != sum(RELEASE_AXES_DIMS_ROPE):
        raise CheckpointError(f"{path}: head_dim {head_dim} is not the release's 128, so the RoPE split cannot be "
                              f"inferred; pass config=FluxDiTConfig(...) to from_pretrained")
    try:
        return FluxDiTConfig(
            in_channels=in_channels,
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            num_double_blocks=count("double_blocks"),
            num_single_blocks=count("single_blocks"),
            mlp_ratio=mlp_hidden / hidden,
            context_dim=_shape(shapes, "txt_in.weight", path)[1],
            pooled_dim=_shape(shapes, "vector_in.in_layer.weight", path)[1],
            axes_dims_rope=RELEASE_AXES_DIMS_ROPE,
            guidance_embed=any(k.startswith("guidance_in.") for k in shapes),
        )
    except ValueError as exc:
        raise CheckpointError(f"{path}: inferred an impossible config: {exc}") from exc


def read_diffusers_config(folder: str | Path) -> FluxDiTConfig:
    """The config in a diffusers `transformer/config.json` (`_class_name: FluxTransformer2DModel`)."""
    return config_files.read_diffusers_config(folder, DIFFUSERS_CLASS, FluxDiTConfig.from_diffusers_json)


def resolve_dit(path: str | Path, config: FluxDiTConfig | None = None) -> FluxDiTSource:
    """Find the DiT in a release folder (original file at the top, or transformer/), a diffusers transformer/
    folder, or an original .safetensors file given directly. `config`, if given, replaces the read/inferred one."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: an original FLUX.1 transformer is one .safetensors file")
        return FluxDiTSource("original", path, config or infer_original_config(path))
    if not path.is_dir():
        raise CheckpointError(f"FLUX.1 checkpoint not found: {path}")
    originals = [path / name for name in ORIGINAL_DIT_FILES if (path / name).is_file()]
    if len(originals) > 1:
        raise CheckpointError(f"{path} holds both {ORIGINAL_DIT_FILES[0]} and {ORIGINAL_DIT_FILES[1]}; "
                              f"pass the file you mean")
    if originals:
        return FluxDiTSource("original", originals[0], config or infer_original_config(originals[0]))
    for folder in (path / DIFFUSERS_DIT_DIR, path):
        if (folder / "config.json").is_file():
            return FluxDiTSource("diffusers", folder, config or read_diffusers_config(folder))
    raise CheckpointError(f"{path} is not a FLUX.1 checkpoint: expected {' or '.join(ORIGINAL_DIT_FILES)} (original "
                          f"layout), {DIFFUSERS_DIT_DIR}/config.json (diffusers release) or config.json (a diffusers "
                          f"transformer folder)")
