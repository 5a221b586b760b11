"""What the service needs to know about a model without loading it: the description every family gives.

A `ModelDescription` is resolved once from a checkpoint folder (models/registry.py) and passed along:
the ingress, the engine, the scheduler and the pools read it instead of any model config field. It
imports nothing heavy (no torch, no transformers), so the light processes can hold it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping

OutputKind = Literal["video", "image"]
GuidanceKind = Literal["cfg", "distilled", "none"]
"""cfg: classifier-free guidance, two branches per step (CFG parallel applies); distilled: the guidance
scale is an input of one forward (FLUX.1-dev); none: one forward, no scale (FLUX.1-schnell)."""


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request gets for every field it leaves empty (user params, per model)."""

    height: int = 480
    width: int = 832
    num_frames: int = 81
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    shift: float = 5.0
    sampler: str = "unipc"
    fps: int = 16


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
class ModelDescription:
    """One served model, as the layers above `models/` see it.

    family: the registry key ("wan"); name: the preset it matches ("wan2.1-t2v-1.3b", "custom");
    root: the checkpoint folder; output: video or image; num_heads: attention heads of the DiT (the
    Ulysses degree must divide them); num_experts: DiTs that share the denoising (Wan2.2 A14B: 2);
    guidance: how the model is guided; defaults: per-request defaults; guidance_scale_2: the second
    expert's default guidance (None with one expert: no such request field); negative_prompt: what
    an empty negative prompt means; text_len: text tokens the DiT takes; components: where each
    part's weights live (for logs and diagnostics).
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
    guidance_scale_2: float | None = None
    negative_prompt: str = ""
    components: Mapping[str, Path] = field(default_factory=dict)

    @property
    def guided_by_default(self) -> bool:
        """Whether a request with default guidance runs two branches (what the automatic CFG layout looks at)."""
        if self.guidance != "cfg":
            return False
        return self.defaults.guidance_scale != 1.0 or (self.guidance_scale_2 or 1.0) != 1.0
