"""Static model parameters of the Z-Image family: the DiT config and the named presets (z-image-turbo, tiny).

Model params are tied to the weights and never change per request. A preset bundles the network config with
the sampling defaults the release recommends. This module imports no torch: the engine reads presets without it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from models.family import LatentGeometry, SamplingDefaults

DIFFUSERS_CLASS = "ZImageTransformer2DModel"

ADALN_DIM_MAX = 256
"""Width of the time conditioning vector: min(dim, 256) (the sinusoid itself is always 256 wide)."""

TIME_MID = 1024
"""Hidden width of the timestep MLP (256 -> 1024 -> min(dim, 256))."""

SEQ_MULTIPLE = 32
"""Image tokens and caption tokens are each padded up to a multiple of this, with learned pad tokens."""


@dataclass(frozen=True)
class ZImageDiTConfig:
    """Shape of one Z-Image DiT (diffusers `ZImageTransformer2DModel`, Tongyi-MAI `ZImageTransformer`).

    dim: model width d = n_heads * head_dim; n_layers: the main single-stream blocks over [image, caption];
    n_refiner_layers: blocks of each refiner (the modulated noise refiner on image tokens and the unmodulated
    context refiner on caption tokens); cap_feat_dim: text encoder width (Qwen3-4B hidden size);
    axes_dims: RoPE channels per position axis (sum = head_dim); axes_lens: RoPE table length per axis (the
    largest position id + 1 that each axis accepts); rope_theta: RoPE base; norm_eps: every RMSNorm's eps;
    patch_size / f_patch_size: latent rows-and-columns / frames per token; in_channels: latent channels;
    t_scale: the factor on t before the sinusoid; qk_norm: per-head RMSNorm on queries and keys.
    n_kv_heads is recorded for the config file only: diffusers (and so the release) ignores it.
    """

    dim: int = 3840
    n_heads: int = 30
    n_kv_heads: int = 30
    n_layers: int = 30
    n_refiner_layers: int = 2
    cap_feat_dim: int = 2560
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1536, 512, 512)
    rope_theta: float = 256.0
    norm_eps: float = 1e-5
    qk_norm: bool = True
    patch_size: int = 2
    f_patch_size: int = 1
    in_channels: int = 16
    t_scale: float = 1000.0

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if sum(self.axes_dims) != self.head_dim:
            raise ValueError(f"axes_dims {self.axes_dims} must sum to head_dim ({self.head_dim})")
        if any(a % 2 for a in self.axes_dims):
            raise ValueError(f"every entry of axes_dims {self.axes_dims} must be even (RoPE rotates pairs)")
        if len(self.axes_dims) != 3 or len(self.axes_lens) != 3:
            raise ValueError(f"Z-Image positions have 3 axes (sequence/frame, row, column); got axes_dims "
                             f"{self.axes_dims}, axes_lens {self.axes_lens}")
        if not self.qk_norm:
            raise ValueError("only qk_norm=True (the release) is implemented")
        if self.f_patch_size != 1:
            raise ValueError(f"f_patch_size {self.f_patch_size}: only 1 (still images) is implemented")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU hidden width, int(d / 3 * 8) as the reference computes it (10240 at d 3840)."""
        return int(self.dim / 3 * 8)

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_DIM_MAX)

    @property
    def patch_features(self) -> int:
        """Values per token: f_patch * patch * patch * channels (64 for the release)."""
        return self.f_patch_size * self.patch_size * self.patch_size * self.in_channels

    @property
    def embedder_key(self) -> str:
        """The ModuleDict key of the patch embedder and final layer, e.g. "2-1"."""
        return f"{self.patch_size}-{self.f_patch_size}"

    # ---- diffusers `transformer/config.json` ----
    @classmethod
    def from_diffusers_json(cls, cfg: dict[str, Any]) -> "ZImageDiTConfig":
        """Read a diffusers `ZImageTransformer2DModel` config.json (missing keys take diffusers' defaults, as
        diffusers itself does; note its default axes_lens (1024, 512, 512) is not the release's)."""
        patches = [int(p) for p in cfg.get("all_patch_size", (2,))]
        f_patches = [int(p) for p in cfg.get("all_f_patch_size", (1,))]
        if len(patches) != 1 or len(f_patches) != 1:
            raise ValueError(f"all_patch_size {patches} / all_f_patch_size {f_patches}: only one patch size "
                             f"(one embedder and final layer) is implemented")
        if cfg.get("siglip_feat_dim") is not None:
            raise ValueError("siglip_feat_dim is set: that is Z-Image-Omni (SigLIP conditioning), not implemented")
        return cls(
            dim=int(cfg.get("dim", 3840)),
            n_heads=int(cfg.get("n_heads", 30)),
            n_kv_heads=int(cfg.get("n_kv_heads", 30)),
            n_layers=int(cfg.get("n_layers", 30)),
            n_refiner_layers=int(cfg.get("n_refiner_layers", 2)),
            cap_feat_dim=int(cfg.get("cap_feat_dim", 2560)),
            axes_dims=tuple(int(a) for a in cfg.get("axes_dims", (32, 48, 48))),
            axes_lens=tuple(int(a) for a in cfg.get("axes_lens", (1024, 512, 512))),
            rope_theta=float(cfg.get("rope_theta", 256.0)),
            norm_eps=float(cfg.get("norm_eps", 1e-5)),
            qk_norm=bool(cfg.get("qk_norm", True)),
            patch_size=patches[0],
            f_patch_size=f_patches[0],
            in_channels=int(cfg.get("in_channels", 16)),
            t_scale=float(cfg.get("t_scale", 1000.0)),
        )

    def to_diffusers_json(self) -> dict[str, Any]:
        return {
            "_class_name": DIFFUSERS_CLASS,
            "all_patch_size": [self.patch_size],
            "all_f_patch_size": [self.f_patch_size],
            "in_channels": self.in_channels,
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_refiner_layers": self.n_refiner_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "norm_eps": self.norm_eps,
            "qk_norm": self.qk_norm,
            "cap_feat_dim": self.cap_feat_dim,
            "siglip_feat_dim": None,
            "rope_theta": self.rope_theta,
            "t_scale": self.t_scale,
            "axes_dims": list(self.axes_dims),
            "axes_lens": list(self.axes_lens),
        }


Z_IMAGE_SAMPLERS: tuple[str, ...] = ("flowmatch-euler",)

Z_IMAGE_TURBO_DEFAULTS = SamplingDefaults(height=1024, width=1024, num_frames=1, num_inference_steps=8,
                                          guidance_scale=None, shift=3.0, sampler="flowmatch-euler", fps=1)
"""Z-Image-Turbo's release recommendations: 8 steps (8 DiT forwards), the static shift 3, 1024 x 1024, and no
classifier-free guidance: the release calls the pipeline with scale 0, under which the diffusers pipeline runs
one forward per step, so Turbo takes no scale at all (guidance "none")."""

Z_IMAGE_LATENT = LatentGeometry(channels=16, temporal_stride=0, spatial_stride=8, patch=(1, 2, 2))
"""The Z-Image VAE (the FLUX.1 autoencoder architecture): 16 channels at 1/8 of the pixels; 2x2 per token."""


@dataclass(frozen=True)
class ZImagePreset:
    """A named Z-Image model: its DiT config, sampling defaults and the text tokens the prompt is padded to
    (only the valid ones reach the DiT)."""

    name: str
    dit: ZImageDiTConfig
    defaults: SamplingDefaults = Z_IMAGE_TURBO_DEFAULTS
    max_sequence_length: int = 512


Z_IMAGE_TURBO = ZImageDiTConfig()
# Tiny shape for tests: diffusers' own test config (dim 16, one head of 16 = 8 + 4 + 4, one layer and one
# refiner block each, caption width 16).
Z_IMAGE_TINY = ZImageDiTConfig(dim=16, n_heads=1, n_kv_heads=1, n_layers=1, n_refiner_layers=1, cap_feat_dim=16,
                               axes_dims=(8, 4, 4), axes_lens=(256, 32, 32), rope_theta=256.0)

PRESETS: dict[str, ZImagePreset] = {
    p.name: p
    for p in (
        ZImagePreset("z-image-turbo", Z_IMAGE_TURBO),
        ZImagePreset("z-image-tiny", Z_IMAGE_TINY,
                     defaults=dataclasses.replace(Z_IMAGE_TURBO_DEFAULTS, height=64, width=64, num_inference_steps=2),
                     max_sequence_length=32),
    )
}


def match_preset(dit: ZImageDiTConfig) -> ZImagePreset:
    """The preset whose network equals `dit`, or a custom one with Turbo's defaults and text length."""
    for preset in PRESETS.values():
        if preset.dit == dit:
            return preset
    return ZImagePreset("custom", dit)


def get_preset(name: str) -> ZImagePreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown Z-Image preset {name!r}; choose one of {sorted(PRESETS)}") from None
