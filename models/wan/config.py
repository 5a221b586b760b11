"""Static model parameters of the Wan family: network configs and named presets.

Model params are tied to the weights and never change per request (docs/design.md, "Three kinds of parameters").
A preset bundles the network configs with the sampling defaults the release recommends,
so the request schema can leave a field empty and still get the model's own default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from models.family import LatentGeometry, SamplingDefaults  # SamplingDefaults is also imported from here

# Keys of the original `config.json` that carry no network shape information.
_ORIGINAL_META_KEYS = {"_class_name", "_diffusers_version", "model_type", "__name__"}


@dataclass(frozen=True)
class WanDiTConfig:
    """Shape of one Wan DiT (`WanModel` in the original code, `WanTransformer3DModel` in diffusers).

    dim: model width d; ffn_dim: FFN hidden width; num_heads: attention heads (head_dim = dim / num_heads);
    num_layers: transformer blocks; freq_dim: width of the timestep sinusoid; in_dim/out_dim: latent channels;
    text_dim: width of the text-encoder output; text_len: context length the text is zero-padded to;
    eps: epsilon of every norm; patch_size: (t, h, w) patch of the Conv3d patch embedding.
    """

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    freq_dim: int = 256
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    # ---- original release `config.json` ----
    @classmethod
    def from_original_json(cls, cfg: dict[str, Any]) -> "WanDiTConfig":
        """Read the original `config.json` (`_class_name: WanModel`).

        The original code ignores patch_size/text_dim from config.json (they always take their
        defaults); we read them when present so that small test checkpoints can differ.
        """
        if cfg.get("model_type", "t2v") != "t2v":
            raise ValueError(f"only text-to-video checkpoints are supported, got model_type={cfg['model_type']!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in known}
        if "patch_size" in kwargs:
            kwargs["patch_size"] = tuple(kwargs["patch_size"])
        return cls(**kwargs)

    def to_original_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"_class_name": "WanModel", "model_type": "t2v"}
        out.update(dataclasses.asdict(self))
        out["patch_size"] = list(self.patch_size)
        return out

    # ---- diffusers `transformer/config.json` ----
    @classmethod
    def from_diffusers_json(cls, cfg: dict[str, Any]) -> "WanDiTConfig":
        if cfg.get("image_dim") is not None or cfg.get("added_kv_proj_dim") is not None:
            raise ValueError("image-to-video transformers (image_dim / added_kv_proj_dim set) are not supported")
        heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
        return cls(
            dim=heads * head_dim,
            ffn_dim=int(cfg["ffn_dim"]),
            num_heads=heads,
            num_layers=int(cfg["num_layers"]),
            freq_dim=int(cfg.get("freq_dim", 256)),
            in_dim=int(cfg.get("in_channels", 16)),
            out_dim=int(cfg.get("out_channels", 16)),
            text_dim=int(cfg.get("text_dim", 4096)),
            # diffusers has no text_len (its pipeline pads to max_sequence_length=512); small test
            # checkpoints record theirs as an extra key, which diffusers ignores.
            text_len=int(cfg.get("text_len", 512)),
            eps=float(cfg.get("eps", 1e-6)),
            patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
        )

    def to_diffusers_json(self) -> dict[str, Any]:
        out = {
            "_class_name": "WanTransformer3DModel",
            "patch_size": list(self.patch_size),
            "num_attention_heads": self.num_heads,
            "attention_head_dim": self.head_dim,
            "in_channels": self.in_dim,
            "out_channels": self.out_dim,
            "text_dim": self.text_dim,
            "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim,
            "num_layers": self.num_layers,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "eps": self.eps,
            "image_dim": None,
            "added_kv_proj_dim": None,
            "rope_max_seq_len": 1024,
        }
        if self.text_len != 512:
            out["text_len"] = self.text_len  # see from_diffusers_json
        return out


# Wan-VAE 2.1 latent normalisation (per channel): encode returns (mu - mean) / std, decode undoes it.
WAN21_LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


@dataclass(frozen=True)
class WanVAEConfig:
    """Shape of the Wan2.1 VAE. The release uses base_dim 96; tests and the tiny model use less."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


# Wan's default negative prompt (`sample_neg_prompt` in the release configs). Wan uses it
# whenever the user's negative prompt is empty; diffusers' WanPipeline does not.
WAN_DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


# The Wan-VAE 2.1 compression (4x in time after the first frame, 8x in space) and latent channels,
# and the DiT's (1, 2, 2) patches: the DiT's token grid follows from them.
WAN_LATENT = LatentGeometry(channels=16, temporal_stride=4, spatial_stride=8, patch=(1, 2, 2))

# What a Wan request may ask for: 4n+1 frames up to 257 (16 s at 16 fps; the RoPE tables cover far more),
# and the flow-matching samplers of stages/samplers.py that run on Wan's schedules, the release's default first.
WAN_MAX_FRAMES = 257
WAN_SAMPLERS: tuple[str, ...] = ("unipc", "dpm++", "euler")


@dataclass(frozen=True)
class WanPreset:
    """A named Wan model: its DiT config(s) and its sampling defaults.

    Two-expert models (Wan2.2 A14B) switch from the high-noise to the low-noise expert when the
    integer timestep drops below `boundary * 1000`; `guidance_scale_2` is the low-noise expert's guidance.
    """

    name: str
    dit: WanDiTConfig
    num_experts: int = 1
    boundary: float | None = None
    guidance_scale_2: float | None = None
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)

    def __post_init__(self) -> None:
        if (self.num_experts == 2) != (self.boundary is not None):
            raise ValueError("a boundary is needed exactly when there are two experts")


WAN21_T2V_1_3B = WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
WAN21_T2V_14B = WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
# Tiny shape for tests (seeded random weights): exercises all three RoPE axes (head_dim 32 -> pairs 6/5/5).
WAN_TINY = WanDiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=64, text_len=32)
# The embedded default model, trained on the synthetic shapes task (models/wan/tiny): head_dim 32 as well.
WAN_TINY_SHAPES = WanDiTConfig(dim=128, ffn_dim=512, num_heads=4, num_layers=4, freq_dim=64, text_dim=64,
                               text_len=32)

PRESETS: dict[str, WanPreset] = {
    p.name: p
    for p in (
        WanPreset("wan2.1-t2v-1.3b", WAN21_T2V_1_3B),
        WanPreset("wan2.1-t2v-14b", WAN21_T2V_14B, defaults=SamplingDefaults(height=720, width=1280)),
        WanPreset(
            "wan2.2-t2v-a14b",
            WAN21_T2V_14B,
            num_experts=2,
            boundary=0.875,
            guidance_scale_2=3.0,
            defaults=SamplingDefaults(num_inference_steps=40, guidance_scale=4.0, shift=12.0),
        ),
        WanPreset(
            "wan-tiny",
            WAN_TINY,
            defaults=SamplingDefaults(height=64, width=64, num_frames=17, num_inference_steps=20, guidance_scale=5.0,
                                      shift=3.0),
        ),
        # Chosen with benchmarks/tiny_accuracy.py (see README, "The embedded default model").
        WanPreset(
            "wan-tiny-shapes",
            WAN_TINY_SHAPES,
            defaults=SamplingDefaults(height=64, width=64, num_frames=17, num_inference_steps=20, guidance_scale=4.0,
                                      shift=3.0),
        ),
    )
}


def get_preset(name: str) -> WanPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def match_preset(dit: WanDiTConfig, num_experts: int) -> WanPreset:
    """The preset whose network equals `dit`, or a custom preset with 2.1-style defaults."""
    for preset in PRESETS.values():
        if preset.dit == dit and preset.num_experts == num_experts:
            return preset
    if num_experts == 2:
        return WanPreset("custom-a14b-style", dit, num_experts=2, boundary=0.875, guidance_scale_2=3.0,
                         defaults=SamplingDefaults(num_inference_steps=40, guidance_scale=4.0, shift=12.0))
    return WanPreset("custom", dit)
