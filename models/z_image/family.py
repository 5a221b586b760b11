"""The Z-Image family's entry in the model registry: which folders are Z-Image checkpoints, their description,
and the factories of their text encoder, DiT and VAE.

A Z-Image folder is the diffusers release (Tongyi-MAI ships only that layout): `model_index.json` naming
`ZImagePipeline`, with transformer/ (`ZImageTransformer2DModel`), text_encoder/ (Qwen3-4B, as transformers
saves it) + tokenizer/, vae/ (`AutoencoderKL` with the FLUX.1 autoencoder's architecture) and scheduler/.
Nothing here imports torch until a factory is called.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from models.config_files import diffusers_transformer_folder, read_diffusers_config, read_json
from models.errors import CheckpointError
from models.family import ModelDescription, TeaCacheCalibration
from models.z_image.config import (
    DIFFUSERS_CLASS,
    Z_IMAGE_LATENT,
    Z_IMAGE_SAMPLERS,
    ZImageDiTConfig,
    ZImagePreset,
    match_preset,
)

if TYPE_CHECKING:
    import torch

    from models.flux.vae import FluxVAE
    from models.qwen3_text import Qwen3PromptEncoder
    from models.z_image.transformer import ZImageTransformer

PIPELINE_CLASS = "ZImagePipeline"
FOLDERS = ("transformer", "text_encoder", "tokenizer", "vae")

TEXT_HIDDEN_LAYERS = (-2,)
"""The Z-Image pipeline conditions on the Qwen3 encoder's second-to-last hidden state (no final norm)."""
TEXT_ENABLE_THINKING = True
"""... of the prompt rendered by the chat template with thinking on (the assistant turn left open)."""


def recognises(root: Path) -> bool:
    """A diffusers folder whose model_index.json names ZImagePipeline."""
    index = root / "model_index.json"
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("_class_name") == PIPELINE_CLASS
    except (OSError, ValueError):
        return False


def describe(root: Path) -> ModelDescription:
    """The description of the Z-Image checkpoint in `root` (CheckpointError naming what is missing otherwise)."""
    missing = [name for name in FOLDERS if not (root / name).is_dir()]
    if missing:
        raise CheckpointError(f"{root}: a Z-Image release folder needs {', '.join(f + '/' for f in FOLDERS)}; "
                              f"missing {', '.join(m + '/' for m in missing)}")
    dit = read_diffusers_config(diffusers_transformer_folder(root, "Z-Image"), DIFFUSERS_CLASS,
                                ZImageDiTConfig.from_diffusers_json)
    text_config = root / "text_encoder" / "config.json"
    width = read_json(text_config).get("hidden_size")
    if width != dit.cap_feat_dim:
        raise CheckpointError(f"{text_config}: hidden_size {width!r} is not the DiT's cap_feat_dim {dit.cap_feat_dim} "
                              f"(the Qwen3 hidden state feeds the caption embedder)")
    components = {name: root / name for name in FOLDERS}
    return description(match_preset(dit), root, components)


def description(preset: ZImagePreset, root: Path = Path("."), components: dict[str, Path] | None = None
                ) -> ModelDescription:
    """What a Z-Image preset means to the layers above models/ (also for presets without a folder).

    Turbo is distilled to 8 steps without guidance: one forward per step, no scale, no negative prompt
    (guidance "none"). TeaCache reads the first noise-refiner block's modulated image tokens; no polynomial
    has been published for Z-Image, so a TeaCache request brings its own (or a calibration supplies it).
    """
    return ModelDescription(
        family="z-image", name=preset.name, root=root, output="image", num_heads=preset.dit.n_heads, num_experts=1,
        guidance="none", defaults=preset.defaults, latent=Z_IMAGE_LATENT, text_len=preset.max_sequence_length,
        samplers=Z_IMAGE_SAMPLERS, max_frames=1, components=dict(components or {}),
        teacache={"default": TeaCacheCalibration("modulated_input", None)},
        num_blocks=preset.dit.n_refiner_layers + preset.dit.n_layers)


# ---- factories: what the stages build from a description (torch and transformers load only here) ----
def load_text_encoder(model: ModelDescription, dtype: "torch.dtype", device: "torch.device | str"
                      ) -> "Qwen3PromptEncoder":
    """Qwen3: the second-to-last hidden state of the thinking-on chat prompt, valid tokens only."""
    from models.qwen3_text import Qwen3PromptEncoder

    return Qwen3PromptEncoder.from_pretrained(model.root, dtype=dtype, device=device, max_length=model.text_len,
                                              hidden_layers=TEXT_HIDDEN_LAYERS, enable_thinking=TEXT_ENABLE_THINKING,
                                              keep_padding=False)


def load_denoisers(model: ModelDescription, dtype: "torch.dtype", device: "torch.device | str"
                   ) -> tuple[list["ZImageTransformer"], None]:
    """The one DiT (Z-Image has no experts)."""
    from models.z_image.transformer import ZImageTransformer

    return [ZImageTransformer.from_pretrained(model.root, dtype=dtype, device=device)], None


def load_decoder(model: ModelDescription, device: "torch.device | str") -> "FluxVAE":
    """The VAE in fp32: the FLUX.1 autoencoder, whose decode undoes the DiT's normalisation with vae/config.json's
    scaling_factor and shift_factor (latents / scale + shift), as the Z-Image pipeline does."""
    import torch

    from models.flux.vae import FluxVAE

    return FluxVAE.from_pretrained(model.components.get("vae", model.root / "vae"), dtype=torch.float32,
                                   device=device)
