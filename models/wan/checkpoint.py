"""Where the parts of a Wan checkpoint live, in either release layout.

Original release (Wan-AI/Wan2.1-T2V-*, Wan2.2-T2V-A14B):
    config.json + diffusion_pytorch_model*.safetensors      (Wan2.1: one DiT at the root)
    high_noise_model/, low_noise_model/                     (Wan2.2 A14B: one DiT folder per expert)
    Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/ (tokenizer)
diffusers (Wan-AI/*-Diffusers):
    model_index.json, transformer/, transformer_2/ (A14B low-noise expert), vae/, text_encoder/, tokenizer/

Resolving a folder only reads small JSON files and checks which files exist; the weights are loaded by
each component's `from_pretrained`, so every stage (and every Ray actor) loads only what it needs.
This module imports neither torch nor transformers: the engine and the HTTP ingress resolve checkpoints
and read presets with it, and they must stay light (tests/test_layering.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from models.config_files import read_json
from models.errors import CheckpointError
from models.wan.config import WanDiTConfig, WanPreset, match_preset

ORIGINAL_VAE_FILE = "Wan2.1_VAE.pth"
ORIGINAL_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
ORIGINAL_TOKENIZER_DIR = "google/umt5-xxl"
ORIGINAL_EXPERT_DIRS = ("high_noise_model", "low_noise_model")
DIFFUSERS_EXPERT_DIRS = ("transformer", "transformer_2")

Layout = Literal["original", "diffusers"]


def read_dit_config(folder: str | Path) -> tuple[WanDiTConfig, Layout]:
    """The DiT config in `folder/config.json`, and which layout wrote it."""
    path = Path(folder) / "config.json"
    cfg = read_json(path)
    cls = cfg.get("_class_name")
    try:
        if cls == "WanTransformer3DModel":
            return WanDiTConfig.from_diffusers_json(cfg), "diffusers"
        if cls in (None, "WanModel"):
            return WanDiTConfig.from_original_json(cfg), "original"
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    raise CheckpointError(f"{path}: _class_name {cls!r} is not a Wan text-to-video transformer")


@dataclass(frozen=True)
class WanCheckpoint:
    """Paths of one Wan checkpoint's components, and the preset its DiT matches.

    transformer_dirs: one folder per expert, the high-noise expert first (Wan2.2 A14B has two).
    vae: the `Wan2.1_VAE.pth` file or the diffusers `vae/` folder.
    text_encoder: the root folder (WanTextEncoder.from_pretrained finds its files in either layout).
    """

    root: Path
    layout: Layout
    transformer_dirs: tuple[Path, ...]
    vae: Path
    text_encoder: Path
    preset: WanPreset

    @classmethod
    def resolve(cls, path: str | Path) -> "WanCheckpoint":
        root = Path(path).expanduser().resolve()
        if not root.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {root}")
        if (root / "model_index.json").is_file():
            return cls._resolve_diffusers(root)
        return cls._resolve_original(root)

    @classmethod
    def _resolve_original(cls, root: Path) -> "WanCheckpoint":
        experts = [root / d for d in ORIGINAL_EXPERT_DIRS]
        if all((d / "config.json").is_file() for d in experts):
            dirs = tuple(experts)
        elif (root / "config.json").is_file():
            dirs = (root,)
        else:
            raise CheckpointError(
                f"{root} is not a Wan checkpoint: expected config.json (Wan2.1), "
                f"{'/ and '.join(ORIGINAL_EXPERT_DIRS)}/ (Wan2.2 A14B) or model_index.json (diffusers)"
            )
        for required in (root / ORIGINAL_VAE_FILE, root / ORIGINAL_T5_FILE, root / ORIGINAL_TOKENIZER_DIR):
            if not required.exists():
                raise CheckpointError(f"{root} lacks {required.name} (original Wan layout)")
        return cls(root, "original", dirs, root / ORIGINAL_VAE_FILE, root, cls._preset(dirs))

    @classmethod
    def _resolve_diffusers(cls, root: Path) -> "WanCheckpoint":
        index = read_json(root / "model_index.json")
        dirs = tuple(root / d for d in DIFFUSERS_EXPERT_DIRS if d in index and index[d] and index[d][0] is not None)
        if not dirs:
            raise CheckpointError(f"{root / 'model_index.json'} names no transformer")
        for required in ("vae", "text_encoder", "tokenizer"):
            if not (root / required).is_dir():
                raise CheckpointError(f"{root} lacks {required}/ (diffusers layout)")
        preset = cls._preset(dirs)
        ratio = index.get("boundary_ratio")
        if len(dirs) == 2 and ratio is not None and ratio != preset.boundary:
            preset = WanPreset(preset.name, preset.dit, 2, float(ratio), preset.guidance_scale_2, preset.defaults)
        return cls(root, "diffusers", dirs, root / "vae", root, preset)

    @staticmethod
    def _preset(dirs: tuple[Path, ...]) -> WanPreset:
        configs = [read_dit_config(d)[0] for d in dirs]
        if len(set(configs)) != 1:
            raise CheckpointError(f"the experts in {[str(d) for d in dirs]} have different configs")
        return match_preset(configs[0], len(dirs))
