"""The FLUX.1 family's entry in the model registry: which folders are FLUX.1 checkpoints, their description,
and the factories of their text encoders, DiT and VAE.

A FLUX.1 folder is a diffusers release (`model_index.json` naming `FluxPipeline`, with transformer/, vae/,
text_encoder/ (CLIP-L), text_encoder_2/ (T5-XXL) and their tokenizers) or a BFL release (`flux1-dev.safetensors`
or `flux1-schnell.safetensors` and `ae.safetensors` at the top, plus the same text-encoder folders, which BFL's
repositories ship in the diffusers layout). Nothing here imports torch until a factory is called.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from models.errors import CheckpointError
from models.family import ModelDescription, TeaCacheCalibration
from models.flux.checkpoint import ORIGINAL_DIT_FILES, resolve_dit
from models.flux.config import FLUX_LATENT, FLUX_SAMPLERS, FluxPreset, match_preset

if TYPE_CHECKING:
    import torch

    from models.flux.text_encoder import FluxTextEncoder
    from models.flux.transformer import FluxTransformer
    from models.flux.vae import FluxVAE

PIPELINE_CLASS = "FluxPipeline"
VAE_FILE, VAE_DIR = "ae.safetensors", "vae"
TEXT_FOLDERS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def recognises(root: Path) -> bool:
    """A diffusers FLUX.1 pipeline folder, or a folder holding an original FLUX.1 transformer file."""
    index = root / "model_index.json"
    if index.is_file():
        try:
            return json.loads(index.read_text()).get("_class_name") == PIPELINE_CLASS
        except (OSError, ValueError):
            return False
    return any((root / name).is_file() for name in ORIGINAL_DIT_FILES)


def describe(root: Path) -> ModelDescription:
    """The description of the FLUX.1 checkpoint in `root` (CheckpointError naming what is missing otherwise)."""
    source = resolve_dit(root)
    vae = root / VAE_FILE if (root / VAE_FILE).is_file() else root / VAE_DIR
    if not vae.exists():
        raise CheckpointError(f"{root}: no FLUX.1 VAE (expected {VAE_FILE} or {VAE_DIR}/)")
    missing = [name for name in TEXT_FOLDERS if not (root / name).is_dir()]
    if missing:
        raise CheckpointError(f"{root}: the FLUX.1 text encoders are missing: {', '.join(m + '/' for m in missing)} "
                              f"(CLIP-L in text_encoder/ + tokenizer/, T5-XXL in text_encoder_2/ + tokenizer_2/)")
    components = {"transformer": source.path, "vae": vae, **{name: root / name for name in TEXT_FOLDERS}}
    return description(match_preset(source.config), root, components)


# TeaCache's published polynomial for FLUX.1-dev (ali-vilab's TeaCache4FLUX, highest order first), read on the
# first double block's modulated image tokens. None for schnell (4 steps leave nothing to skip) or the tiny models.
FLUX_TEACACHE_COEFFICIENTS = {"flux1-dev": (4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00,
                                            2.64230861e-01)}


# MagCache's published residual-norm ratio curve for FLUX.1-dev (Zehong-Ma/MagCache's MagCache4FLUX, calibrated
# with 28 steps; one branch; the first step padded with 1.0). Other step counts resample it (nearest point).
FLUX_MAGCACHE_RATIOS: dict[str, tuple[tuple[float, ...], ...]] = {
    "flux1-dev": ((
        1.0, 1.21094, 1.11719, 1.07812, 1.0625, 1.03906, 1.03125, 1.03906, 1.02344, 1.03125, 1.02344, 0.98047,
        1.01562, 1.00781, 1.0, 1.00781, 1.0, 1.00781, 1.0, 1.0, 0.99609, 0.99609, 0.98047, 0.98828, 0.96484,
        0.95703, 0.93359, 0.89062,
    ),),
}


def description(preset: FluxPreset, root: Path = Path("."), components: dict[str, Path] | None = None
                ) -> ModelDescription:
    """What a FLUX.1 preset means to the layers above models/ (also for presets without a folder).

    dev's guidance embedding makes its guidance "distilled" (the scale is an input of one forward);
    schnell has none ("none"). Neither runs a negative branch, so neither takes a negative prompt.
    """
    return ModelDescription(
        family="flux", name=preset.name, root=root, output="image", num_heads=preset.dit.num_heads, num_experts=1,
        guidance="distilled" if preset.dit.guidance_embed else "none", defaults=preset.defaults, latent=FLUX_LATENT,
        text_len=preset.max_sequence_length, samplers=FLUX_SAMPLERS, max_frames=1,
        components=dict(components or {}),
        teacache={"default": TeaCacheCalibration("modulated_input", FLUX_TEACACHE_COEFFICIENTS.get(preset.name))},
        num_blocks=preset.dit.num_double_blocks + preset.dit.num_single_blocks,
        magcache=FLUX_MAGCACHE_RATIOS.get(preset.name))


# ---- factories: what the stages build from a description (torch and transformers load only here) ----
def load_text_encoder(model: ModelDescription, dtype: "torch.dtype", device: "torch.device | str"
                      ) -> "FluxTextEncoder":
    """CLIP-L (pooled vector) and T5-XXL (the sequence, padded to the model's T5 length)."""
    from models.flux.text_encoder import FluxTextEncoder

    return FluxTextEncoder.from_pretrained(model.root, dtype=dtype, device=device,
                                           max_sequence_length=model.text_len)


def load_denoisers(model: ModelDescription, dtype: "torch.dtype", device: "torch.device | str"
                   ) -> tuple[list["FluxTransformer"], None]:
    """The one DiT (FLUX.1 has no experts)."""
    from models.flux.transformer import FluxTransformer

    return [FluxTransformer.from_pretrained(model.root, dtype=dtype, device=device)], None


def load_decoder(model: ModelDescription, device: "torch.device | str") -> "FluxVAE":
    """The FLUX.1 VAE in fp32."""
    import torch

    from models.flux.vae import FluxVAE

    return FluxVAE.from_pretrained(model.components.get("vae", model.root), dtype=torch.float32, device=device)
