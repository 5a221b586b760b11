"""Static model parameters of the FLUX.1 family: the DiT config and the named presets (dev, schnell, tiny).

Model params are tied to the weights and never change per request (docs/design.md, "Three kinds of parameters").
A preset bundles the network config with the sampling defaults the release recommends. This module imports
no torch: the engine reads presets without it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from models.family import DynamicShift, LatentGeometry, SamplingDefaults


@dataclass(frozen=True)
class FluxDiTConfig:
    """Shape of one FLUX.1 DiT (BFL `Flux`, diffusers `FluxTransformer2DModel`).

    in_channels: packed token width, 4 x the latent channels (the model packs 2x2 latent patches itself);
    hidden_size: model width d = num_heads * head_dim; num_double_blocks / num_single_blocks: the two block
    kinds (joint text+image blocks with separate weights per stream, then blocks on the concatenated sequence);
    mlp_ratio: MLP hidden width / d; context_dim: T5 width; pooled_dim: CLIP pooled width;
    axes_dims_rope: RoPE channels per position axis (sums to head_dim); theta: RoPE base;
    guidance_embed: dev's distilled-guidance embedding (schnell has none).
    """

    in_channels: int = 64
    hidden_size: int = 3072
    num_heads: int = 24
    num_double_blocks: int = 19
    num_single_blocks: int = 38
    mlp_ratio: float = 4.0
    context_dim: int = 4096
    pooled_dim: int = 768
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    theta: int = 10000
    guidance_embed: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if sum(self.axes_dims_rope) != self.head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to head_dim ({self.head_dim})")
        if any(a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"every entry of axes_dims_rope {self.axes_dims_rope} must be even (RoPE rotates pairs)")
        if len(self.axes_dims_rope) != 3:
            raise ValueError(f"FLUX.1 positions have 3 axes (0, row, col); got axes_dims_rope {self.axes_dims_rope}")
        if self.in_channels % 4:
            raise ValueError(f"in_channels ({self.in_channels}) must be 4 x the latent channels (2x2 packing)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def latent_channels(self) -> int:
        return self.in_channels // 4

    # ---- diffusers `transformer/config.json` ----
    @classmethod
    def from_diffusers_json(cls, cfg: dict[str, Any]) -> "FluxDiTConfig":
        """Read a diffusers `FluxTransformer2DModel` config.json (patch_size 1; the pipeline packs 2x2 patches)."""
        if int(cfg.get("patch_size", 1)) != 1:
            raise ValueError(f"patch_size {cfg['patch_size']} is not FLUX.1's 1")
        out_channels = cfg.get("out_channels")
        in_channels = int(cfg.get("in_channels", 64))
        if out_channels not in (None, in_channels):
            raise ValueError(f"out_channels {out_channels} differs from in_channels {in_channels}; FLUX.1 predicts "
                             f"a velocity shaped like its input")
        heads, head_dim = int(cfg.get("num_attention_heads", 24)), int(cfg.get("attention_head_dim", 128))
        return cls(
            in_channels=in_channels,
            hidden_size=heads * head_dim,
            num_heads=heads,
            num_double_blocks=int(cfg.get("num_layers", 19)),
            num_single_blocks=int(cfg.get("num_single_layers", 38)),
            context_dim=int(cfg.get("joint_attention_dim", 4096)),
            pooled_dim=int(cfg.get("pooled_projection_dim", 768)),
            axes_dims_rope=tuple(int(a) for a in cfg.get("axes_dims_rope", (16, 56, 56))),
            guidance_embed=bool(cfg.get("guidance_embeds", False)),
        )

    def to_diffusers_json(self) -> dict[str, Any]:
        if self.mlp_ratio != 4.0 or self.theta != 10000:
            raise ValueError("diffusers' FluxTransformer2DModel fixes mlp_ratio 4 and theta 10000")
        return {
            "_class_name": "FluxTransformer2DModel",
            "patch_size": 1,
            "in_channels": self.in_channels,
            "out_channels": None,
            "num_layers": self.num_double_blocks,
            "num_single_layers": self.num_single_blocks,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "joint_attention_dim": self.context_dim,
            "pooled_projection_dim": self.pooled_dim,
            "guidance_embeds": self.guidance_embed,
            "axes_dims_rope": list(self.axes_dims_rope),
        }


FLUX_SAMPLERS: tuple[str, ...] = ("flowmatch-euler",)
"""FLUX.1 samples with the Euler update on diffusers' FlowMatchEulerDiscreteScheduler schedule (stages/samplers.py)."""

FLUX_DEV_DEFAULTS = SamplingDefaults(height=1024, width=1024, num_frames=1, num_inference_steps=28,
                                     guidance_scale=3.5, shift=DynamicShift(), sampler="flowmatch-euler", fps=1)
"""FLUX.1-dev's release recommendations: 28 steps, distilled guidance 3.5 (the scale fed to its guidance
embedding; one forward per step, no classifier-free guidance), the resolution-dependent shift."""

FLUX_SCHNELL_DEFAULTS = dataclasses.replace(FLUX_DEV_DEFAULTS, num_inference_steps=4, guidance_scale=None, shift=1.0)
"""FLUX.1-schnell's: 4 steps, no guidance input at all, the plain linear schedule (shift 1)."""


@dataclass(frozen=True)
class FluxPreset:
    """A named FLUX.1 model: its DiT config, its sampling defaults, and max_sequence_length, the T5 tokens the
    prompt is padded to (dev 512; schnell was trained with 256)."""

    name: str
    dit: FluxDiTConfig
    defaults: SamplingDefaults = FLUX_DEV_DEFAULTS
    max_sequence_length: int = 512

    def __post_init__(self) -> None:
        if self.dit.guidance_embed != (self.defaults.guidance_scale is not None):
            raise ValueError(f"preset {self.name!r}: a default guidance_scale is needed exactly when the DiT has a "
                             f"guidance embedding")


FLUX_LATENT = LatentGeometry(channels=16, temporal_stride=0, spatial_stride=8, patch=(1, 2, 2))
"""The FLUX.1 VAE's latents: 16 channels at 1/8 of the pixels, no frame axis; the DiT packs 2x2 into a token."""

FLUX1_DEV = FluxDiTConfig(guidance_embed=True)
FLUX1_SCHNELL = FluxDiTConfig(guidance_embed=False)
# Tiny shape for tests (seeded random weights): head_dim 128 with the release's RoPE split, so checkpoints of
# this shape infer their config from tensor shapes exactly as the released files do.
FLUX_TINY = FluxDiTConfig(hidden_size=256, num_heads=2, num_double_blocks=2, num_single_blocks=2, context_dim=64,
                          pooled_dim=32, guidance_embed=True)
FLUX_TINY_SCHNELL = FluxDiTConfig(hidden_size=256, num_heads=2, num_double_blocks=2, num_single_blocks=2,
                                  context_dim=64, pooled_dim=32, guidance_embed=False)

PRESETS: dict[str, FluxPreset] = {
    p.name: p
    for p in (
        FluxPreset("flux1-dev", FLUX1_DEV),
        FluxPreset("flux1-schnell", FLUX1_SCHNELL, defaults=FLUX_SCHNELL_DEFAULTS, max_sequence_length=256),
        FluxPreset(
            "flux-tiny",
            FLUX_TINY,
            defaults=dataclasses.replace(FLUX_DEV_DEFAULTS, height=64, width=64, num_inference_steps=4),
            max_sequence_length=32,
        ),
        FluxPreset(
            "flux-tiny-schnell",
            FLUX_TINY_SCHNELL,
            defaults=dataclasses.replace(FLUX_SCHNELL_DEFAULTS, height=64, width=64, num_inference_steps=2),
            max_sequence_length=32,
        ),
    )
}


def get_preset(name: str) -> FluxPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown FLUX preset {name!r}; choose one of {sorted(PRESETS)}") from None


def match_preset(dit: FluxDiTConfig) -> FluxPreset:
    """The preset whose network equals `dit`, or a custom one with dev- or schnell-style defaults."""
    for preset in PRESETS.values():
        if preset.dit == dit:
            return preset
    base = PRESETS["flux1-dev" if dit.guidance_embed else "flux1-schnell"]
    return FluxPreset("custom", dit, defaults=base.defaults, max_sequence_length=base.max_sequence_length)



# The autoencoder's and the text encoders' configs are in vae_config.py and text_config.py.
