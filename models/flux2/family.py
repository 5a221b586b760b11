"""The FLUX.2-klein family's entry in the model registry: which folders are klein checkpoints, their description,
and the factories of their text encoder, DiT and VAE.

A klein folder is a diffusers release (`model_index.json` naming `Flux2KleinPipeline`, with transformer/, vae/,
text_encoder/ (Qwen3) and tokenizer/) or a folder in BFL's layout: one original FLUX.2 transformer file at the
top (recognised by its keys, whatever its name, e.g. `flux-2-klein-4b.safetensors`), BFL's autoencoder file
(`flux2-vae.safetensors`) or a vae/ folder, and the same text_encoder/ + tokenizer/ folders. Nothing here
imports torch until a factory is called.

Guidance: the released klein models are step-distilled (`is_distilled` in model_index.json): one forward per
step, no guidance input, no negative prompt ("none"). A base (non-distilled) klein folder runs true CFG as its
pipeline does, v_u + g (v_c - v_u) with the empty prompt as the negative one, at the pipeline's defaults (50
steps, g = 4). A BFL-layout folder has no model_index.json and is taken as distilled.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from models.config_files import read_json
from models.errors import CheckpointError
from models.family import ModelDescription, TeaCacheCalibration
from models.flux2.checkpoint import is_original_dit_file, resolve_dit
from models.flux2.config import FLUX2_LATENT, FLUX2_SAMPLERS, Flux2Preset, match_preset
from models.flux2.vae_config import FLUX2_VAE

if TYPE_CHECKING:
    import torch

    from models.flux2.text_encoder import Flux2TextEncoder
    from models.flux2.transformer import Flux2Transformer
    from models.flux2.vae import Flux2VAE

PIPELINE_CLASS = "Flux2KleinPipeline"
VAE_FILES, VAE_DIR = ("flux2-vae.safetensors", "flux2-vae.sft", "ae.safetensors"), "vae"
"""Names of BFL's autoencoder file at the top of a folder (as `models.flux2.vae.ORIGINAL_FILENAMES`), or vae/."""
TEXT_FOLDERS = ("text_encoder", "tokenizer")
BASE_STEPS, BASE_GUIDANCE = 50, 4.0
"""Flux2KleinPipeline's defaults, which a base (non-distilled) klein runs with."""


def _index(root: Path) -> dict | None:
    path = root / "model_index.json"
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except CheckpointError:
        return None


def recognises(root: Path) -> bool:
    """A diffusers Flux2KleinPipeline folder, or a folder (without model_index.json) holding an original FLUX.2
    transformer file at the top."""
    index = _index(root)
    if index is not None or (root / "model_index.json").exists():
        return bool(index) and index.get("_class_name") == PIPELINE_CLASS
    return any(is_original_dit_file(p) for p in root.glob("*.safetensors"))


def describe(root: Path) -> ModelDescription:
    """The description of the klein checkpoint in `root` (CheckpointError naming what is missing otherwise)."""
    source = resolve_dit(root)
    vae = next((root / name for name in VAE_FILES if (root / name).is_file()), root / VAE_DIR)
    if not vae.exists():
        raise CheckpointError(f"{root}: no FLUX.2 VAE (expected {VAE_FILES[0]} or {VAE_DIR}/)")
    missing = [name for name in TEXT_FOLDERS if not (root / name).is_dir()]
    if missing:
        raise CheckpointError(f"{root}: the FLUX.2-klein text encoder is missing: "
                              f"{', '.join(m + '/' for m in missing)} (Qwen3 in text_encoder/ + tokenizer/)")
    if source.config.guidance_embed:
        raise CheckpointError(f"{source.path}: this DiT has a guidance embedding (FLUX.2-dev's shape), but "
                              f"{PIPELINE_CLASS} feeds it no guidance; it is not a klein model")
    index = _index(root) or {}
    distilled = index.get("is_distilled", True)
    if not isinstance(distilled, bool):
        raise CheckpointError(f"{root / 'model_index.json'}: is_distilled must be true or false, got {distilled!r}")
    components = {"transformer": source.path, "vae": vae, **{name: root / name for name in TEXT_FOLDERS}}
    return description(match_preset(source.config), root, components, distilled=distilled)


def description(preset: Flux2Preset, root: Path = Path("."), components: dict[str, Path] | None = None,
                distilled: bool = True) -> ModelDescription:
    """What a FLUX.2 preset means to the layers above models/ (also for presets without a folder).

    distilled (the released klein): guidance "none", the preset's defaults (4 steps). Not distilled (a base
    klein): true CFG ("cfg", the empty negative prompt) at the pipeline's 50 steps and g = 4, named
    `<preset>-base`. A DiT with a guidance embedding (a custom FLUX.2-dev-shaped preset) takes its scale as a
    model input ("distilled"). The shift is the empirical rule of the preset's defaults in every case.
    """
    name, defaults = preset.name, preset.defaults
    if preset.dit.guidance_embed:
        guidance = "distilled"
    elif distilled:
        guidance = "none"
    else:
        guidance = "cfg"
        name = f"{preset.name}-base"
        defaults = dataclasses.replace(defaults, num_inference_steps=BASE_STEPS, guidance_scale=BASE_GUIDANCE)
    return ModelDescription(
        family="flux2", name=name, root=root, output="image", num_heads=preset.dit.num_heads, num_experts=1,
        guidance=guidance, defaults=defaults, latent=FLUX2_LATENT, text_len=preset.max_sequence_length,
        samplers=FLUX2_SAMPLERS, max_frames=1, components=dict(components or {}),
        teacache={"default": TeaCacheCalibration("modulated_input", None)},
        num_blocks=preset.dit.num_double_blocks + preset.dit.num_single_blocks)


# ---- factories: what the stages build from a description (torch and transformers load only here) ----
def load_text_encoder(model: ModelDescription, dtype: "torch.dtype", device: "torch.device | str"
                      ) -> "Flux2TextEncoder":
    """Qwen3, hidden states 9/18/27 side by side, every prompt padded to the model's text length."""
    from models.flux2.text_encoder import Flux2TextEncoder

    return Flux2TextEncoder.from_pretrained(model.root, dtype=dtype, device=device, max_length=model.text_len)


def load_denoisers(model: ModelDescription, dtype: "torch.dtype", device: "torch.device | str"
                   ) -> tuple[list["Flux2Transformer"], None]:
    """The one DiT (FLUX.2 has no experts)."""
    from models.flux2.transformer import Flux2Transformer

    return [Flux2Transformer.from_pretrained(model.components.get("transformer", model.root), dtype=dtype,
                                             device=device)], None


def load_decoder(model: ModelDescription, device: "torch.device | str") -> "Flux2VAE":
    """The FLUX.2 VAE in fp32 (its latents: `FLUX2_LATENT`, 128 channels at 1/16 of the pixels)."""
    import torch

    from models.flux2.vae import Flux2VAE

    vae = Flux2VAE.from_pretrained(model.components.get("vae", model.root), dtype=torch.float32, device=device)
    if vae.config.dit_channels != model.latent.channels or vae.config.spatial_stride != model.latent.spatial_stride:
        raise CheckpointError(f"{model.root}: the VAE gives {vae.config.dit_channels}-channel latents at 1/"
                              f"{vae.config.spatial_stride} of the pixels, the DiT takes {model.latent.channels} at "
                              f"1/{model.latent.spatial_stride} (FLUX.2's are {FLUX2_VAE.dit_channels} at 1/"
                              f"{FLUX2_VAE.spatial_stride})")
    return vae
