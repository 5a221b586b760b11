"""The Wan family's entry in the model registry: which folders are Wan checkpoints, their description, and
the factories of their text encoder, DiT experts and VAE."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from models.family import ModelDescription, TeaCacheCalibration
from models.wan.checkpoint import ORIGINAL_EXPERT_DIRS, WanCheckpoint
from models.wan.config import WAN_DEFAULT_NEGATIVE_PROMPT, WAN_LATENT, WAN_MAX_FRAMES, WAN_SAMPLERS, WanPreset

if TYPE_CHECKING:
    import torch

    from models.wan.text_encoder import WanTextEncoder
    from models.wan.transformer import WanTransformer
    from models.wan.vae import WanVAE


def recognises(root: Path) -> bool:
    """A diffusers Wan pipeline folder, or an original release folder (a Wan DiT config at the root or
    one per Wan2.2 expert). A folder that looks like Wan but lacks a part is still Wan's: `describe`
    then says what is missing."""
    index = root / "model_index.json"
    if index.is_file():
        try:
            return str(json.loads(index.read_text()).get("_class_name", "")).startswith("Wan")
        except (OSError, ValueError):
            return False
    configs = [root / "config.json"] if (root / "config.json").is_file() else [
        root / d / "config.json" for d in ORIGINAL_EXPERT_DIRS]
    try:
        return all(json.loads(c.read_text()).get("_class_name") in (None, "WanModel") for c in configs)
    except (OSError, ValueError):
        return False


def describe(root: Path) -> ModelDescription:
    """The description of the Wan checkpoint in `root` (CheckpointError naming what is missing otherwise)."""
    checkpoint = WanCheckpoint.resolve(root)
    experts = {f"transformer{'' if i == 0 else f'_{i + 1}'}": d for i, d in enumerate(checkpoint.transformer_dirs)}
    return description(checkpoint.preset, checkpoint.root,
                       {**experts, "vae": checkpoint.vae, "text_encoder": checkpoint.text_encoder})


# TeaCache's published polynomials for Wan2.1 text-to-video (ali-vilab's TeaCache4Wan2.1, highest order first),
# per mode: "default" reads the timestep embedding e, "ret_steps" the blocks' modulation e0. None is published
# for Wan2.2 or the tiny models (a request gives its own, or a calibration will).
WAN_TEACACHE_COEFFICIENTS: dict[str, dict[str, tuple[float, ...]]] = {
    "wan2.1-t2v-1.3b": {
        "default": (2.39676752e+03, -1.31110545e+03, 2.01331979e+02, -8.29855975e+00, 1.37887774e-01),
        "ret_steps": (-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02),
    },
    "wan2.1-t2v-14b": {
        "default": (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
        "ret_steps": (-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01),
    },
}
WAN_TEACACHE_SIGNALS = {"default": "time_embedding", "ret_steps": "time_projection"}


def teacache_modes(preset_name: str) -> dict[str, TeaCacheCalibration]:
    published = WAN_TEACACHE_COEFFICIENTS.get(preset_name, {})
    return {mode: TeaCacheCalibration(signal, published.get(mode)) for mode, signal in WAN_TEACACHE_SIGNALS.items()}


def description(preset: WanPreset, root: Path = Path("."), components: Mapping[str, Path] | None = None
                ) -> ModelDescription:
    """What a Wan preset means to the layers above models/ (also for presets without a folder, e.g. in tests)."""
    return ModelDescription(
        family="wan", name=preset.name, root=root, output="video", num_heads=preset.dit.num_heads,
        num_experts=preset.num_experts, guidance="cfg", defaults=preset.defaults, latent=WAN_LATENT,
        text_len=preset.dit.text_len, samplers=WAN_SAMPLERS, max_frames=WAN_MAX_FRAMES,
        guidance_scale_2=preset.guidance_scale_2, negative_prompt=WAN_DEFAULT_NEGATIVE_PROMPT,
        components=dict(components or {}), teacache=teacache_modes(preset.name))


# ---- factories: what the stages build from a description (torch and transformers load only here) ----
def _checkpoint(model: ModelDescription) -> WanCheckpoint:
    return WanCheckpoint.resolve(model.root)


def load_text_encoder(model: ModelDescription, dtype: "torch.dtype", device: "torch.device | str") -> "WanTextEncoder":
    """umT5-XXL, cutting prompts to the DiT's context length."""
    from models.wan.text_encoder import WanTextEncoder

    return WanTextEncoder.from_pretrained(_checkpoint(model).text_encoder, dtype=dtype, device=device,
                                          text_len=model.text_len)


def load_denoisers(model: ModelDescription, dtype: "torch.dtype", device: "torch.device | str"
                   ) -> tuple[list["WanTransformer"], float | None]:
    """The expert DiT(s), high-noise first, and the switching boundary (None with one expert)."""
    from models.wan.transformer import WanTransformer

    checkpoint = _checkpoint(model)
    experts = [WanTransformer.from_pretrained(d, dtype=dtype, device=device) for d in checkpoint.transformer_dirs]
    return experts, checkpoint.preset.boundary


def load_decoder(model: ModelDescription, device: "torch.device | str") -> "WanVAE":
    """The Wan-VAE in fp32 (as the reference decodes)."""
    import torch

    from models.wan.vae import WanVAE

    return WanVAE.from_pretrained(_checkpoint(model).vae, dtype=torch.float32, device=device)
