"""Static model parameters of the FLUX.2 family: the DiT config and the named presets (klein 4B / 9B, tiny).

Model params are tied to the weights and never change per request. A preset bundles the network config with
the sampling defaults the release recommends. This module imports no torch: the engine reads presets without it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from models.family import EmpiricalShift, LatentGeometry, SamplingDefaults

DIFFUSERS_CLASS = "Flux2Transformer2DModel"

TIME_CHANNELS = 256
"""Width of the timestep (and guidance) sinusoid; diffusers' `timestep_guidance_channels`."""

NORM_EPS = 1e-6
"""eps of every LayerNorm and of the q/k RMSNorms (the release's; diffusers' `eps`)."""


@dataclass(frozen=True)
class Flux2DiTConfig:
    """Shape of one FLUX.2 DiT (BFL `Flux2`, diffusers `Flux2Transformer2DModel`). The defaults are klein-4B's.

    in_channels: features per image token (the 32-channel VAE latent patchified 2x2 = 128; one token per
    position of the (H/16, W/16) grid); hidden_size: model width d = num_heads * head_dim; num_double_blocks /
    num_single_blocks: joint blocks with separate weights per stream, then blocks on the concatenated sequence;
    mlp_ratio: SwiGLU inner width / d (the first MLP matmul makes twice that: gate and value); context_dim: text
    width (three Qwen3 hidden states stacked, 3 x 2560 for klein-4B); axes_dims_rope: RoPE channels per
    position axis (time, row, column, text index; sums to head_dim); theta: RoPE base; guidance_embed: a
    distilled-guidance embedder (FLUX.2-dev; the klein models have none). No Linear has a bias.
    """

    in_channels: int = 128
    hidden_size: int = 3072
    num_heads: int = 24
    num_double_blocks: int = 5
    num_single_blocks: int = 20
    mlp_ratio: float = 3.0
    context_dim: int = 7680
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    theta: int = 2000
    guidance_embed: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if len(self.axes_dims_rope) != 4:
            raise ValueError(f"FLUX.2 positions have 4 axes (time, row, column, text index); got axes_dims_rope "
                             f"{self.axes_dims_rope}")
        if sum(self.axes_dims_rope) != self.head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to head_dim ({self.head_dim})")
        if any(a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"every entry of axes_dims_rope {self.axes_dims_rope} must be even (RoPE rotates pairs)")
        if self.mlp_hidden <= 0 or self.in_channels <= 0 or self.context_dim <= 0:
            raise ValueError(f"mlp_ratio ({self.mlp_ratio}), in_channels ({self.in_channels}) and context_dim "
                             f"({self.context_dim}) must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU inner width int(d * mlp_ratio) (9216 for klein-4B)."""
        return int(self.hidden_size * self.mlp_ratio)

    # ---- diffusers `transformer/config.json` ----
    @classmethod
    def from_diffusers_json(cls, cfg: dict[str, Any]) -> "Flux2DiTConfig":
        """Read a diffusers `Flux2Transformer2DModel` config.json. Missing keys take diffusers' defaults (those
        of FLUX.2-dev), as diffusers itself does; unknown keys are ignored, as diffusers does."""
        if int(cfg.get("patch_size", 1)) != 1:
            raise ValueError(f"patch_size {cfg['patch_size']} is not FLUX.2's 1 (the pipeline patchifies latents)")
        in_channels = int(cfg.get("in_channels", 128))
        out_channels = cfg.get("out_channels")
        if out_channels not in (None, in_channels):
            raise ValueError(f"out_channels {out_channels} differs from in_channels {in_channels}; FLUX.2 predicts "
                             f"a velocity shaped like its input")
        if int(cfg.get("timestep_guidance_channels", TIME_CHANNELS)) != TIME_CHANNELS:
            raise ValueError(f"timestep_guidance_channels {cfg['timestep_guidance_channels']} is not the release's "
                             f"{TIME_CHANNELS}")
        if float(cfg.get("eps", NORM_EPS)) != NORM_EPS:
            raise ValueError(f"eps {cfg['eps']} is not the release's {NORM_EPS}")
        heads, head_dim = int(cfg.get("num_attention_heads", 48)), int(cfg.get("attention_head_dim", 128))
        return cls(
            in_channels=in_channels,
            hidden_size=heads * head_dim,
            num_heads=heads,
            num_double_blocks=int(cfg.get("num_layers", 8)),
            num_single_blocks=int(cfg.get("num_single_layers", 48)),
            mlp_ratio=float(cfg.get("mlp_ratio", 3.0)),
            context_dim=int(cfg.get("joint_attention_dim", 15360)),
            axes_dims_rope=tuple(int(a) for a in cfg.get("axes_dims_rope", (32, 32, 32, 32))),
            theta=int(cfg.get("rope_theta", 2000)),
            guidance_embed=bool(cfg.get("guidance_embeds", True)),
        )

    def to_diffusers_json(self) -> dict[str, Any]:
        return {
            "_class_name": DIFFUSERS_CLASS,
            "patch_size": 1,
            "in_channels": self.in_channels,
            "out_channels": None,
            "num_layers": self.num_double_blocks,
            "num_single_layers": self.num_single_blocks,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "joint_attention_dim": self.context_dim,
            "timestep_guidance_channels": TIME_CHANNELS,
            "mlp_ratio": self.mlp_ratio,
            "axes_dims_rope": list(self.axes_dims_rope),
            "rope_theta": self.theta,
            "eps": NORM_EPS,
            "guidance_embeds": self.guidance_embed,
        }


FLUX2_SAMPLERS: tuple[str, ...] = ("flowmatch-euler",)
"""FLUX.2 samples with the Euler update on diffusers' FlowMatchEulerDiscreteScheduler schedule (stages/samplers.py)."""

FLUX2_KLEIN_DEFAULTS = SamplingDefaults(height=1024, width=1024, num_frames=1, num_inference_steps=4,
                                        guidance_scale=None, shift=EmpiricalShift(), sampler="flowmatch-euler", fps=1)
"""The klein release's recommendations: 4 steps of the step-distilled model, one forward per step with no
guidance input and no negative branch, the shift fitted to the image size and the step count, 1024 x 1024."""

FLUX2_GUIDED_DEFAULTS = dataclasses.replace(FLUX2_KLEIN_DEFAULTS, num_inference_steps=50, guidance_scale=4.0)
"""For a custom DiT with a guidance embedding (FLUX.2-dev's shape): diffusers' Flux2Pipeline defaults, 50 steps
and the distilled guidance 4.0 fed to that embedding."""

FLUX2_LATENT = LatentGeometry(channels=128, temporal_stride=0, spatial_stride=16, patch=(1, 1, 1))
"""What the DiT sees: the 32-channel VAE latent (1/8 of the pixels) patchified 2x2 into 128 channels at 1/16 of
the pixels, normalised by the VAE's batch-norm statistics; one token per latent position."""


@dataclass(frozen=True)
class Flux2Preset:
    """A named FLUX.2 model: its DiT config, its sampling defaults, and max_sequence_length, the Qwen3 tokens
    every prompt is padded to (all of them enter the DiT, padding included)."""

    name: str
    dit: Flux2DiTConfig
    defaults: SamplingDefaults = FLUX2_KLEIN_DEFAULTS
    max_sequence_length: int = 512

    def __post_init__(self) -> None:
        if self.dit.guidance_embed and self.defaults.guidance_scale is None:
            raise ValueError(f"preset {self.name!r}: a DiT with a guidance embedding needs a default guidance_scale")


FLUX2_KLEIN_4B = Flux2DiTConfig()
FLUX2_KLEIN_9B = Flux2DiTConfig(hidden_size=4096, num_heads=32, num_double_blocks=8, num_single_blocks=24,
                                context_dim=12288)
# Tiny shape for tests (seeded random weights): head_dim 128 with the release's RoPE split, so original files of
# this shape infer their config from tensor shapes exactly as the released ones do; the release's 128 input
# channels (the tiny VAE has 32 latent channels too); text width 48 = 3 stacked hidden states of width 16.
FLUX2_TINY = Flux2DiTConfig(hidden_size=256, num_heads=2, num_double_blocks=2, num_single_blocks=2, context_dim=48)

PRESETS: dict[str, Flux2Preset] = {
    p.name: p
    for p in (
        Flux2Preset("flux2-klein-4b", FLUX2_KLEIN_4B),
        Flux2Preset("flux2-klein-9b", FLUX2_KLEIN_9B),
        Flux2Preset("flux2-tiny", FLUX2_TINY,
                    defaults=dataclasses.replace(FLUX2_KLEIN_DEFAULTS, height=64, width=64), max_sequence_length=32),
    )
}


def get_preset(name: str) -> Flux2Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown FLUX.2 preset {name!r}; choose one of {sorted(PRESETS)}") from None


def match_preset(dit: Flux2DiTConfig) -> Flux2Preset:
    """The preset whose network equals `dit`, or a custom one with klein's defaults (guided ones with a guidance
    embedding)."""
    for preset in PRESETS.values():
        if preset.dit == dit:
            return preset
    return Flux2Preset("custom", dit, defaults=FLUX2_GUIDED_DEFAULTS if dit.guidance_embed else FLUX2_KLEIN_DEFAULTS)
