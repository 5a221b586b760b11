"""Static model parameters of the Qwen-Image family: the DiT config and the named presets (qwen-image, tiny).

Model params are tied to the weights and never change per request. A preset bundles the network config with
the sampling defaults the release recommends. This module imports no torch: the engine reads presets without it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from models.family import DynamicShift, LatentGeometry, SamplingDefaults

DIFFUSERS_CLASS = "QwenImageTransformer2DModel"

ROPE_THETA = 10000
"""RoPE base (fixed in the reference, not a config.json key)."""

ROPE_MAX_POSITION = 4096
"""The reference tabulates RoPE angles for positions -4096 ... 4095 on every axis; no position may leave that range."""

NORM_EPS = 1e-6
"""eps of every LayerNorm and RMSNorm (fixed in the reference)."""

_UNSUPPORTED_FLAGS = ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")
"""diffusers flags of later variants (Qwen-Image-Edit-2511, Qwen-Image-Layered); False in the text-to-image release."""


@dataclass(frozen=True)
class QwenImageDiTConfig:
    """Shape of one Qwen-Image DiT (diffusers `QwenImageTransformer2DModel`), with diffusers' field names.

    num_layers: dual-stream blocks; num_attention_heads * attention_head_dim = the model width d;
    joint_attention_dim: text encoder width (Qwen2.5-VL-7B hidden size); in_channels: features per image token
    (the 2x2-packed latent, 4 * 16); out_channels: latent channels of the output (proj_out gives
    patch_size^2 * out_channels per token); axes_dims_rope: RoPE channels per position axis (frame, row, column;
    sum = head_dim). guidance_embeds is recorded for the config file only: the reference builds no guidance
    embedder from it.
    """

    num_layers: int = 60
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    joint_attention_dim: int = 3584
    in_channels: int = 64
    out_channels: int = 16
    patch_size: int = 2
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    guidance_embeds: bool = False

    def __post_init__(self) -> None:
        if len(self.axes_dims_rope) != 3:
            raise ValueError(f"Qwen-Image positions have 3 axes (frame, row, column); got axes_dims_rope "
                             f"{self.axes_dims_rope}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                             f"({self.attention_head_dim})")
        if any(a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"every entry of axes_dims_rope {self.axes_dims_rope} must be even (RoPE rotates pairs)")
        if self.in_channels != self.patch_size ** 2 * self.out_channels:
            raise ValueError(f"in_channels {self.in_channels} must be patch_size^2 * out_channels "
                             f"({self.patch_size ** 2 * self.out_channels}): the velocity must have the latent's "
                             f"shape")

    @property
    def dim(self) -> int:
        """Model width d = heads * head_dim (3072 for the release)."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim

    @property
    def mlp_hidden(self) -> int:
        """GELU-tanh MLP hidden width, 4 d."""
        return 4 * self.dim

    @property
    def latent_channels(self) -> int:
        """Channels of the (unpacked) latent: in_channels / patch_size^2 (16 for the release)."""
        return self.in_channels // self.patch_size ** 2

    @property
    def patch_features(self) -> int:
        """Output values per token: patch_size^2 * out_channels (64 for the release)."""
        return self.patch_size ** 2 * self.out_channels

    # ---- diffusers `transformer/config.json` ----
    @classmethod
    def from_diffusers_json(cls, cfg: dict[str, Any]) -> "QwenImageDiTConfig":
        """Read a diffusers `QwenImageTransformer2DModel` config.json (missing keys take diffusers' defaults, as
        diffusers itself does; unknown keys are ignored, as diffusers does). A null out_channels means
        in_channels, as in the reference."""
        on = [flag for flag in _UNSUPPORTED_FLAGS if cfg.get(flag)]
        if on:
            raise ValueError(f"{', '.join(on)} set: a Qwen-Image-Edit-2511 / Layered variant, not implemented")
        in_channels = int(cfg.get("in_channels", 64))
        out_channels = cfg.get("out_channels", 16)
        return cls(
            num_layers=int(cfg.get("num_layers", 60)),
            num_attention_heads=int(cfg.get("num_attention_heads", 24)),
            attention_head_dim=int(cfg.get("attention_head_dim", 128)),
            joint_attention_dim=int(cfg.get("joint_attention_dim", 3584)),
            in_channels=in_channels,
            out_channels=int(out_channels) if out_channels else in_channels,
            patch_size=int(cfg.get("patch_size", 2)),
            axes_dims_rope=tuple(int(a) for a in cfg.get("axes_dims_rope", (16, 56, 56))),  # type: ignore[arg-type]
            guidance_embeds=bool(cfg.get("guidance_embeds", False)),
        )

    def to_diffusers_json(self) -> dict[str, Any]:
        return {
            "_class_name": DIFFUSERS_CLASS,
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.num_layers,
            "attention_head_dim": self.attention_head_dim,
            "num_attention_heads": self.num_attention_heads,
            "joint_attention_dim": self.joint_attention_dim,
            "guidance_embeds": self.guidance_embeds,
            "axes_dims_rope": list(self.axes_dims_rope),
            "zero_cond_t": False,
            "use_additional_t_cond": False,
            "use_layer3d_rope": False,
        }


QWEN_IMAGE_SAMPLERS: tuple[str, ...] = ("flowmatch-euler",)

QWEN_IMAGE_SHIFT = DynamicShift(base_shift=0.5, max_shift=0.9, base_seq_len=256, max_seq_len=8192)
"""The release scheduler's resolution-dependent shift (mu from 0.5 at 256 tokens to 0.9 at 8192 tokens). The
scheduler applies it as an exponential time shift and then stretches the schedule so its last nonzero sigma is
`QwenImagePreset.shift_terminal`; `DynamicShift` holds only the mu line."""

QWEN_IMAGE_DEFAULTS = SamplingDefaults(height=1328, width=1328, num_frames=1, num_inference_steps=50,
                                       guidance_scale=4.0, shift=QWEN_IMAGE_SHIFT, sampler="flowmatch-euler", fps=1)
"""Qwen-Image's release recommendations: 50 steps, true classifier-free guidance at 4.0 (two DiT forwards per
step; the diffusers pipeline rescales the combined prediction per token to the norm of the conditional one),
1328 x 1328 for a square image (the diffusers pipeline's own default size is 1024 x 1024)."""

QWEN_IMAGE_LATENT = LatentGeometry(channels=16, temporal_stride=0, spatial_stride=8, patch=(1, 2, 2))
"""The Qwen-Image VAE (the Wan2.1 VAE architecture, run on one frame): 16 channels at 1/8 of the pixels; the DiT
packs 2x2 latent pixels into a token. The VAE itself takes (B, 16, 1, H/8, W/8); the DiT sees (B, 16, H/8, W/8)."""


@dataclass(frozen=True)
class QwenImagePreset:
    """A named Qwen-Image model: its DiT config, sampling defaults, the most text tokens the prompt keeps (the
    diffusers pipeline's `max_sequence_length` default, after the 34 chat-template tokens are dropped), the
    schedule's terminal sigma and the negative prompt the release uses when none is given."""

    name: str
    dit: QwenImageDiTConfig
    defaults: SamplingDefaults = QWEN_IMAGE_DEFAULTS
    max_sequence_length: int = 512
    shift_terminal: float = 0.02
    negative_prompt: str = " "


QWEN_IMAGE = QwenImageDiTConfig()
# Tiny shape for tests: diffusers' own test config (patch 2, 16 packed input features = 4 latent channels,
# 2 layers, 4 heads of 16 = 8 + 4 + 4, text width 16).
QWEN_IMAGE_TINY = QwenImageDiTConfig(num_layers=2, num_attention_heads=4, attention_head_dim=16,
                                     joint_attention_dim=16, in_channels=16, out_channels=4, patch_size=2,
                                     axes_dims_rope=(8, 4, 4))

PRESETS: dict[str, QwenImagePreset] = {
    p.name: p
    for p in (
        QwenImagePreset("qwen-image", QWEN_IMAGE),
        QwenImagePreset("qwen-image-tiny", QWEN_IMAGE_TINY,
                        defaults=dataclasses.replace(QWEN_IMAGE_DEFAULTS, height=64, width=64, num_inference_steps=2),
                        max_sequence_length=32),
    )
}


def get_preset(name: str) -> QwenImagePreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown Qwen-Image preset {name!r}; choose one of {sorted(PRESETS)}") from None


def match_preset(dit: QwenImageDiTConfig) -> QwenImagePreset:
    """The preset whose network equals `dit`, or a custom one with the release's defaults."""
    for preset in PRESETS.values():
        if preset.dit == dit:
            return preset
    return QwenImagePreset("custom", dit)
