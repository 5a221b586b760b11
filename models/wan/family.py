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

# MagCache's published residual-norm ratio curves for Wan2.1 text-to-video (Zehong-Ma/MagCache's MagCache4Wan2.1,
# calibrated with 50 steps and CFG), one curve per branch (conditional, unconditional); the reference
# interleaves the two and pads the first step with 1.0. Other step counts resample them (nearest point).
WAN_MAGCACHE_RATIOS: dict[str, tuple[tuple[float, ...], ...]] = {
    "wan2.1-t2v-1.3b": (
        (
            1.0, 1.0124, 1.00166, 0.99791, 0.99682, 0.99634, 0.99567, 0.99416, 0.99578, 0.9957, 0.99511, 0.99535,
            0.99552, 0.99541, 0.9954, 0.99489, 0.99518, 0.99484, 0.99481, 0.99415, 0.99419, 0.99396, 0.99388,
            0.99349, 0.99309, 0.9927, 0.99228, 0.99171, 0.99137, 0.99068, 0.99005, 0.98944, 0.98849, 0.98758,
            0.98644, 0.98504, 0.9836, 0.98202, 0.97977, 0.97717, 0.9741, 0.97003, 0.96538, 0.9593, 0.95086,
            0.94013, 0.92402, 0.90241, 0.86821, 0.81838,
        ),
        (
            1.0, 1.02213, 1.0041, 1.00061, 0.99762, 0.99685, 0.99586, 0.99422, 0.99575, 0.99563, 0.99506, 0.99531,
            0.99549, 0.99539, 0.99536, 0.99485, 0.99514, 0.99478, 0.99479, 0.99413, 0.99416, 0.99393, 0.99386,
            0.99349, 0.99304, 0.9927, 0.99226, 0.9917, 0.99135, 0.99063, 0.99003, 0.98942, 0.98849, 0.98757,
            0.98643, 0.98503, 0.98359, 0.98201, 0.97978, 0.97718, 0.97411, 0.97002, 0.96541, 0.95933, 0.95089,
            0.94019, 0.92414, 0.9026, 0.86868, 0.81939,
        ),
    ),
    "wan2.1-t2v-14b": (
        (
            1.0, 1.02504, 1.00025, 0.9985, 0.99779, 0.9966, 0.99482, 0.99467, 0.99664, 0.99434, 0.99533, 0.99468,
            0.99438, 0.99516, 0.99384, 0.99404, 0.99517, 0.99409, 0.99428, 0.99347, 0.99418, 0.99271, 0.99313,
            0.99215, 0.99218, 0.99216, 0.99163, 0.99138, 0.98982, 0.98996, 0.9887, 0.98772, 0.98767, 0.98573,
            0.98501, 0.9838, 0.98177, 0.98037, 0.97678, 0.97546, 0.97184, 0.96711, 0.96349, 0.95629, 0.94926,
            0.93964, 0.92511, 0.90693, 0.8796, 0.86111,
        ),
        (
            1.0, 1.03017, 1.00251, 0.99962, 0.99771, 0.99658, 0.99476, 0.99451, 0.99656, 0.99431, 0.99545, 0.99465,
            0.99434, 0.99517, 0.9938, 0.99401, 0.99516, 0.99408, 0.99426, 0.99343, 0.99416, 0.99269, 0.99311,
            0.99215, 0.99215, 0.99217, 0.99161, 0.99135, 0.9898, 0.98995, 0.98866, 0.9877, 0.98765, 0.9857,
            0.98498, 0.98376, 0.98173, 0.98035, 0.97677, 0.97543, 0.97183, 0.96708, 0.96345, 0.95625, 0.94929,
            0.93961, 0.92504, 0.90678, 0.87945, 0.86189,
        ),
    ),
}


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
        components=dict(components or {}), teacache=teacache_modes(preset.name), num_blocks=preset.dit.num_layers,
        magcache=WAN_MAGCACHE_RATIOS.get(preset.name))


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
