"""What the service needs to know about a model without loading it: the description every family gives.

A `ModelDescription` is resolved once from a checkpoint folder (models/registry.py) and passed along:
the ingress, the engine, the scheduler and the pools read it instead of any model config field. It
imports nothing heavy (no torch, no transformers), so the light processes can hold it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

OutputKind = Literal["video", "image"]
GuidanceKind = Literal["cfg", "distilled", "none"]
CfgForm = Literal["uncond", "cond"]
"""How true CFG combines the branches: "uncond" v_u + g (v_c - v_u), "cond" v_c + g (v_c - v_u) (Z-Image)."""


def neutral_guidance_scale(form: CfgForm) -> float:
    """The scale at which a CFG form gives the conditional velocity alone (so one branch suffices): 1 for
    "uncond", 0 for "cond"."""
    return 1.0 if form == "uncond" else 0.0
"""cfg: classifier-free guidance, two branches per step (CFG parallel applies); distilled: the guidance
scale is an input of one forward (FLUX.1-dev); none: one forward, no scale (FLUX.1-schnell)."""


@dataclass(frozen=True)
class DynamicShift:
    """A timestep shift that grows with the image: s = exp(mu), mu linear in the image-token count.

    mu runs through (base_seq_len, base_shift) and (max_seq_len, max_shift) and is extrapolated beyond
    both ends. The defaults are FLUX.1-dev's (0.5 at 256 tokens = 256x256 pixels, 1.15 at 4096 tokens =
    1024x1024 pixels), as its diffusers pipeline computes them; `mu` uses the same operations in the same
    order (slope, intercept, then tokens * slope + intercept), so the float result is identical.
    """

    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096

    def mu(self, image_seq_len: int) -> float:
        m = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        b = self.base_shift - m * self.base_seq_len
        return image_seq_len * m + b

    def shift(self, image_seq_len: int) -> float:
        """The shift s = exp(mu) for a sequence of `image_seq_len` image tokens."""
        return math.exp(self.mu(image_seq_len))

    def describe(self) -> str:
        return (f"exp(mu), mu linear in the image tokens from {self.base_shift:g} at {self.base_seq_len} to "
                f"{self.max_shift:g} at {self.max_seq_len} tokens (one token per 16x16 pixels)")


@dataclass(frozen=True)
class EmpiricalShift:
    """FLUX.2's timestep shift s = exp(mu), with mu fitted to both the image-token count and the step count.

    Two lines in the token count, mu = a * tokens + b, one fitted for 10 steps (a10, b10) and one for 200 steps
    (a200, b200); mu is linear in the steps between (and beyond) them. Above `large_seq_len` tokens the
    200-step line is used at every step count. The constants are FLUX.2's release's (its diffusers pipeline's
    `compute_empirical_mu`), evaluated in the same order, so the float result is identical.
    """

    a10: float = 8.73809524e-05
    b10: float = 1.89833333
    a200: float = 0.00016927
    b200: float = 0.45666666
    large_seq_len: int = 4300

    def mu(self, image_seq_len: int, num_steps: int) -> float:
        if image_seq_len > self.large_seq_len:
            return float(self.a200 * image_seq_len + self.b200)
        m_200 = self.a200 * image_seq_len + self.b200
        m_10 = self.a10 * image_seq_len + self.b10
        a = (m_200 - m_10) / 190.0
        b = m_200 - 200.0 * a
        return float(a * num_steps + b)

    def shift(self, image_seq_len: int, num_steps: int) -> float:
        """The shift s = exp(mu) for `image_seq_len` image tokens denoised in `num_steps` steps."""
        return math.exp(self.mu(image_seq_len, num_steps))

    def describe(self) -> str:
        return ("exp(mu), mu fitted to the image tokens (one per 16x16 pixels) and the number of steps "
                "(FLUX.2's empirical rule)")


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request gets for every field it leaves empty (user params, per model).

    The class defaults are Wan2.1's. guidance_scale: the CFG scale, or the distilled scale of a
    guidance-distilled model; None for a model that takes no scale (FLUX.1-schnell). shift: a fixed
    timestep shift, a `DynamicShift` computed from each request's size (FLUX.1-dev, Qwen-Image), or an
    `EmpiricalShift` from its size and step count (FLUX.2). sampler: the
    default among the family's samplers. fps: frame rate of the output video (1 for an image model).
    """

    height: int = 480
    width: int = 832
    num_frames: int = 81
    num_inference_steps: int = 50
    guidance_scale: float | None = 5.0
    shift: float | DynamicShift | EmpiricalShift = 5.0
    sampler: str = "unipc"
    fps: int = 16


@dataclass(frozen=True)
class FrameRule:
    """Which num_frames a model takes: stride * n + 1 up to max_frames for a video model, 1 for an image model
    (stride 0)."""

    stride: int
    max_frames: int

    def allows(self, num_frames: int) -> bool:
        if self.stride == 0:
            return num_frames == 1
        return 1 <= num_frames <= self.max_frames and (num_frames - 1) % self.stride == 0

    def values(self) -> tuple[int, ...]:
        """Every allowed value, ascending."""
        return (1,) if self.stride == 0 else tuple(range(1, self.max_frames + 1, self.stride))

    def describe(self) -> str:
        """The rule in words, e.g. "of the form 4n+1 (1, 5, 9, ..., 81, ...) between 1 and 257"."""
        if self.stride == 0:
            return "1 (the model makes single images)"
        s = self.stride
        return (f"of the form {s}n+1 (1, {1 + s}, {1 + 2 * s}, ..., {1 + 20 * s}, ...) between 1 and "
                f"{self.max_frames}")


@dataclass(frozen=True)
class LatentGeometry:
    """How pixels map to latents and latents to DiT tokens.

    channels: latent channels; temporal_stride: pixel frames per latent frame after the first (the
    first frame is kept on its own, so frames = temporal_stride * n + 1), or 0 for an image model whose
    latents have no frame axis; spatial_stride: pixels per latent row/column; patch: latent (frames,
    rows, columns) per DiT token.
    """

    channels: int
    temporal_stride: int
    spatial_stride: int
    patch: tuple[int, int, int] = (1, 2, 2)

    @property
    def is_video(self) -> bool:
        return self.temporal_stride > 0

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """(C, F', H', W') of a (num_frames, height, width) request; (C, H', W') for an image model."""
        rows, cols = height // self.spatial_stride, width // self.spatial_stride
        if not self.is_video:
            return (self.channels, rows, cols)
        return (self.channels, (num_frames - 1) // self.temporal_stride + 1, rows, cols)

    def tokens(self, num_frames: int, height: int, width: int) -> int:
        """DiT sequence length (image or video tokens) of a request."""
        shape = self.latent_shape(num_frames, height, width)
        f, h, w = shape[1:] if self.is_video else (1, *shape[1:])
        pf, ph, pw = self.patch
        return (f // pf) * (h // ph) * (w // pw)


@dataclass(frozen=True)
class TeaCacheCalibration:
    """How TeaCache runs in one of its modes on a model: the `cache_signal` it reads and the polynomial
    (highest order first) that rescales the signal's relative change; None where nobody published one for
    this model (a request then gives its own coefficients)."""

    signal: str
    coefficients: tuple[float, ...] | None = None


@dataclass(frozen=True)
class CacheThresholds:
    """A calibration's sweep of one cache kind on this model: the knobs it ran (`spec`, without the threshold)
    and the (mean PSNR in dB against full compute, threshold) points it measured."""

    spec: Mapping[str, Any]
    points: tuple[tuple[float, float], ...]

    def threshold_for(self, target_psnr: float) -> float:
        """The largest measured threshold whose mean PSNR met the target; 0 (full compute) when none did."""
        met = [threshold for psnr, threshold in self.points if psnr >= target_psnr]
        return max(met) if met else 0.0


@dataclass(frozen=True)
class ModelDescription:
    """One served model, as the layers above `models/` see it; the request schema's per-model rules come from it.

    family: the registry key ("wan"); name: the preset it matches ("wan2.1-t2v-1.3b", "custom");
    root: the checkpoint folder; output: video or image; num_heads: attention heads of the DiT (the
    Ulysses degree must divide them); num_experts: DiTs that share the denoising (Wan2.2 A14B: 2);
    guidance: how the model is guided; defaults: per-request defaults; text_len: text tokens the DiT
    takes; samplers: the sampler names the family offers (defaults.sampler is one of them);
    max_frames: the most frames a request may ask for (1 for an image model; the frame stride comes
    from `latent`); guidance_scale_2: the second expert's default guidance (None with one expert: no
    such request field); negative_prompt: what an empty negative prompt means (cfg models only);
    components: where each part's weights live (for logs and diagnostics); teacache: TeaCache's modes on
    this model (mode -> signal and published coefficients); num_blocks: the DiT's blocks, every kind (0:
    not known); magcache: MagCache's residual-norm ratio curves, one per branch (conditional first), None
    where none is published or calibrated; cache_thresholds: from a calibration, per cache kind its
    measured thresholds, for requests that name a quality target (`target_psnr`); cfg_form: how true CFG combines
    the branches, "uncond" v_u + g (v_c - v_u) (Wan, Qwen-Image) or "cond" v_c + g (v_c - v_u) (Z-Image); cfg_renorm:
    the combined velocity is rescaled, per DiT token, to the conditional velocity's norm (Qwen-Image);
    shift_terminal: the flow-match schedule is stretched so its last non-zero sigma is this (Qwen-Image: 0.02).
    """

    family: str
    name: str
    root: Path
    output: OutputKind
    num_heads: int
    num_experts: int
    guidance: GuidanceKind
    defaults: SamplingDefaults
    latent: LatentGeometry
    text_len: int
    samplers: tuple[str, ...]
    max_frames: int = 1
    guidance_scale_2: float | None = None
    negative_prompt: str = ""
    components: Mapping[str, Path] = field(default_factory=dict)
    teacache: Mapping[str, TeaCacheCalibration] = field(default_factory=dict)
    num_blocks: int = 0
    magcache: tuple[tuple[float, ...], ...] | None = None
    cache_thresholds: Mapping[str, CacheThresholds] = field(default_factory=dict)
    cfg_form: CfgForm = "uncond"
    cfg_renorm: bool = False
    shift_terminal: float | None = None

    def __post_init__(self) -> None:
        if self.defaults.sampler not in self.samplers:
            raise ValueError(f"{self.name}: default sampler {self.defaults.sampler!r} is not one of the family's "
                             f"samplers {self.samplers}")
        if not self.frames.allows(self.defaults.num_frames):
            raise ValueError(f"{self.name}: default num_frames {self.defaults.num_frames} breaks the frame rule "
                             f"({self.frames.describe()})")
        if (self.defaults.guidance_scale is None) != (self.guidance == "none"):
            raise ValueError(f"{self.name}: a default guidance_scale is needed exactly when the guidance kind is "
                             f"not 'none' (got {self.defaults.guidance_scale!r} with {self.guidance!r})")
        if self.guidance_scale_2 is not None and (self.num_experts != 2 or self.guidance != "cfg"):
            raise ValueError(f"{self.name}: guidance_scale_2 is the second CFG expert's; this model has "
                             f"{self.num_experts} expert(s) and {self.guidance!r} guidance")
        if (self.cfg_renorm or self.cfg_form != "uncond") and self.guidance != "cfg":
            raise ValueError(f"{self.name}: cfg_form / cfg_renorm describe true CFG; this model has {self.guidance!r} "
                             f"guidance")
        if self.shift_terminal is not None and not 0 < self.shift_terminal < 1:
            raise ValueError(f"{self.name}: shift_terminal must be in (0, 1), got {self.shift_terminal}")

    @property
    def frames(self) -> FrameRule:
        """Which num_frames a request may ask for."""
        return FrameRule(self.latent.temporal_stride, self.max_frames if self.latent.is_video else 1)

    @property
    def takes_guidance_scale(self) -> bool:
        """False for a model with no guidance input at all (FLUX.1-schnell)."""
        return self.guidance != "none"

    @property
    def takes_guidance_scale_2(self) -> bool:
        """Only two-expert CFG models have a second expert's scale."""
        return self.guidance_scale_2 is not None

    @property
    def takes_negative_prompt(self) -> bool:
        """Only a true-CFG model runs a negative branch."""
        return self.guidance == "cfg"

    def shift_for(self, num_frames: int, height: int, width: int, num_steps: int) -> float:
        """The default timestep shift of a request of this size and step count (a fixed number, or the rule's
        value)."""
        rule = self.defaults.shift
        if isinstance(rule, DynamicShift):
            return rule.shift(self.latent.tokens(num_frames, height, width))
        if isinstance(rule, EmpiricalShift):
            return rule.shift(self.latent.tokens(num_frames, height, width), num_steps)
        return float(rule)

    def describe_shift(self) -> str:
        """The default shift in words (for the request schema's documentation and errors)."""
        rule = self.defaults.shift
        return rule.describe() if isinstance(rule, (DynamicShift, EmpiricalShift)) else f"{rule:g}"

    @property
    def guided_by_default(self) -> bool:
        """Whether a request with default guidance runs two branches (what the automatic CFG layout looks at)."""
        if self.guidance != "cfg":
            return False
        neutral = neutral_guidance_scale(self.cfg_form)
        second = self.guidance_scale_2 if self.guidance_scale_2 is not None else neutral
        return self.defaults.guidance_scale != neutral or second != neutral
