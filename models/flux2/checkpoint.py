"""Where a FLUX.2 DiT lives, in either release layout, and its config (read or inferred), without torch.

diffusers layout (black-forest-labs/FLUX.2-klein-*): `transformer/config.json` + `diffusion_pytorch_model*.safetensors`
(sharded with an `.index.json` or not). Original BFL layout: one `.safetensors` file with BFL key names and no
config (e.g. `flux-2-klein-4b.safetensors`; the config is inferred from the tensor shapes). In a release folder
the diffusers `transformer/` is taken first; without one, the single top-level `.safetensors` file whose keys
are a FLUX.2 transformer's (other top-level files, such as the VAE, are not). A file may also be named directly.

Only small JSON (config.json, the safetensors header) is read here; the weights are loaded by
`Flux2Transformer.from_pretrained`. No torch: the engine resolves checkpoints with this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from models import config_files
from models.errors import CheckpointError
from models.flux.checkpoint import read_safetensors_shapes
from models.flux2.config import DIFFUSERS_CLASS, Flux2DiTConfig
from models.key_maps import strip_prefix

DIFFUSERS_DIT_DIR = "transformer"
ORIGINAL_DIT_FILES = {"flux2-klein-4b": "flux-2-klein-4b.safetensors", "flux2-klein-9b": "flux-2-klein-9b.safetensors"}
"""Original file names by preset (the names BFL's scripts recognise; any name is accepted when loading)."""
DEFAULT_ORIGINAL_FILE = "flux-2-transformer.safetensors"
"""The file `save_pretrained(layout="original")` writes for a DiT that matches no released preset."""
MARKER_KEY = "double_stream_modulation_img.lin.weight"
"""A key every original FLUX.2 transformer file has (the shared modulations are FLUX.2's own)."""
RELEASE_AXES_DIMS_ROPE = (32, 32, 32, 32)
"""The released RoPE split for head_dim 128; the original file does not record it."""
RELEASE_THETA = 2000

Layout = Literal["original", "diffusers"]


@dataclass(frozen=True)
class Flux2DiTSource:
    """One FLUX.2 DiT checkpoint: its layout, the file (original) or folder (diffusers) and its config."""

    layout: Layout
    path: Path
    config: Flux2DiTConfig


def _shape(shapes: dict[str, tuple[int, ...]], key: str, path: Path) -> tuple[int, ...]:
    try:
        return shapes[key]
    except KeyError:
        raise CheckpointError(f"{path} lacks {key}, which every FLUX.2 transformer has; it is not a FLUX.2 "
                              f"transformer in the original layout") from None


def infer_original_config(path: str | Path) -> Flux2DiTConfig:
    """The config of an original (BFL-layout) FLUX.2 file, inferred from its tensor shapes.

    The RoPE split and base are not in the file: head_dim 128 gets the release's (32, 32, 32, 32) and 2000; any
    other head_dim needs an explicit config (`Flux2Transformer.from_pretrained(..., config=...)`).
    """
    path = Path(path)
    shapes = {strip_prefix(k): v for k, v in read_safetensors_shapes(path).items()}
    _shape(shapes, MARKER_KEY, path)
    hidden, in_channels = _shape(shapes, "img_in.weight", path)

    def count(kind: str) -> int:
        found = {int(m.group(1)) for k in shapes if (m := re.match(rf"{kind}\.(\d+)\.", k))}
        return max(found) + 1 if found else 0

    doubles, singles = count("double_blocks"), count("single_blocks")
    if doubles:
        head_dim = _shape(shapes, "double_blocks.0.img_attn.norm.query_norm.scale", path)[0]
        mlp_hidden = _shape(shapes, "double_blocks.0.img_mlp.2.weight", path)[1]
    elif singles:
        head_dim = _shape(shapes, "single_blocks.0.norm.query_norm.scale", path)[0]
        mlp_hidden = _shape(shapes, "single_blocks.0.linear2.weight", path)[1] - hidden
    else:
        raise CheckpointError(f"{path} has no double_blocks.* or single_blocks.*: not a FLUX.2 transformer")
    if head_dim != sum(RELEASE_AXES_DIMS_ROPE):
        raise CheckpointError(f"{path}: head_dim {head_dim} is not the release's 128, so the RoPE split cannot be "
                              f"inferred; pass config=Flux2DiTConfig(...) to from_pretrained")
    try:
        return Flux2DiTConfig(
            in_channels=in_channels,
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            num_double_blocks=doubles,
            num_single_blocks=singles,
            mlp_ratio=mlp_hidden / hidden,
            context_dim=_shape(shapes, "txt_in.weight", path)[1],
            axes_dims_rope=RELEASE_AXES_DIMS_ROPE,
            theta=RELEASE_THETA,
            guidance_embed=any(k.startswith("guidance_in.") for k in shapes),
        )
    except ValueError as exc:
        raise CheckpointError(f"{path}: inferred an impossible config: {exc}") from exc


def read_diffusers_config(folder: str | Path) -> Flux2DiTConfig:
    """The config in a diffusers `transformer/config.json` (`_class_name: Flux2Transformer2DModel`)."""
    return config_files.read_diffusers_config(folder, DIFFUSERS_CLASS, Flux2DiTConfig.from_diffusers_json)


def is_original_dit_file(path: str | Path) -> bool:
    """Whether a .safetensors file holds an original FLUX.2 transformer (reads its header only)."""
    try:
        return any(strip_prefix(k) == MARKER_KEY for k in read_safetensors_shapes(path))
    except CheckpointError:
        return False


def resolve_dit(path: str | Path, config: Flux2DiTConfig | None = None) -> Flux2DiTSource:
    """Find the DiT in a release folder (transformer/ first, else the one original file at the top), a diffusers
    transformer/ folder, or an original .safetensors file given directly. `config`, if given, replaces the
    read/inferred one."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: an original FLUX.2 transformer is one .safetensors file")
        return Flux2DiTSource("original", path, config or infer_original_config(path))
    if not path.is_dir():
        raise CheckpointError(f"FLUX.2 checkpoint not found: {path}")
    for folder in (path / DIFFUSERS_DIT_DIR, path):
        if (folder / "config.json").is_file():
            return Flux2DiTSource("diffusers", folder, config or read_diffusers_config(folder))
    originals = sorted(p for p in path.glob("*.safetensors") if is_original_dit_file(p))
    if len(originals) > 1:
        raise CheckpointError(f"{path} holds several FLUX.2 transformer files ({', '.join(p.name for p in originals)}); "
                              f"pass the file you mean")
    if originals:
        return Flux2DiTSource("original", originals[0], config or infer_original_config(originals[0]))
    raise CheckpointError(f"{path} is not a FLUX.2 checkpoint: expected {DIFFUSERS_DIT_DIR}/config.json (diffusers "
                          f"release), config.json (a diffusers transformer folder) or one original transformer "
                          f".safetensors file at the top (e.g. {ORIGINAL_DIT_FILES['flux2-klein-4b']})")
