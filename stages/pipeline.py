"""The in-process pipeline: text encode -> denoise -> decode in one process, no Ray.

It is the reference path for the distributed service, the CLI's local mode and the baseline
the benchmarks compare against. Each stage can also be built alone (the Ray actors do that).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from flexcache.strategy import CacheStrategy
from models.family import ModelDescription
from models.registry import describe, resolve_model_path
from parallel.mesh import ParallelMesh
from stages.decode import DecodeStage
from stages.denoise import DenoiseStage, ProgressFn
from stages.devices import default_dtype
from stages.params import GenerationParams, ResolvedParams
from stages.text_encode import TextEncodeStage

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """frames: (T, H, W, 3) uint8; timings: seconds per stage plus 'total'; cache: what the feature cache
    computed and reused (`flexcache.strategy.CacheStats.as_dict`), None without one."""

    frames: np.ndarray
    params: ResolvedParams
    timings: dict[str, float] = field(default_factory=dict)
    latents: torch.Tensor | None = None
    cache: dict[str, int] | None = None


class Pipeline:
    """Chains the three stages for one request at a time.

    With a `ParallelMesh` (every rank of a torch.distributed group runs the same Pipeline calls),
    the denoiser is spread over the mesh and the VAE decodes one strip per rank of the whole group;
    text encoding is cheap and runs on every rank.
    """

    def __init__(self, text_stage: TextEncodeStage, denoise_stage: DenoiseStage, decode_stage: DecodeStage,
                 model: ModelDescription, model_name: str = "", mesh: ParallelMesh | None = None) -> None:
        self.text_stage = text_stage
        self.denoise_stage = denoise_stage
        self.decode_stage = decode_stage
        self.model = model
        self.model_name = model_name or model.name
        self.mesh = mesh

    @classmethod
    def from_pretrained(cls, path_or_preset: str | Path | None = None, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", mesh: ParallelMesh | None = None,
                        calibration: str | Path | None = None) -> "Pipeline":
        """A checkpoint folder (original or diffusers layout), or None / a bundled model's name; `calibration`: a
        feature-cache calibration file to use instead of the folder's own."""
        root = resolve_model_path(path_or_preset)
        model = describe(root, calibration)
        dtype = dtype or default_dtype(device)
        logger.info("loading %s (%s, preset %s) in %s on %s", root, model.family, model.name, dtype, device)
        return cls(
            TextEncodeStage.from_pretrained(model, dtype=dtype, device=device),
            DenoiseStage.from_pretrained(model, dtype=dtype, device=device, mesh=mesh),
            DecodeStage.from_pretrained(model, device=device),
            model,
            model_name=str(root),
            mesh=mesh,
        )

    def resolve(self, params: GenerationParams | ResolvedParams | Mapping[str, Any]) -> ResolvedParams:
        """Validate user params and fill every empty field with this model's default."""
        if isinstance(params, ResolvedParams):
            return params
        if not isinstance(params, GenerationParams):
            params = GenerationParams.model_validate(params)
        return params.resolve(self.model)

    def generate(self, params: GenerationParams | ResolvedParams | Mapping[str, Any], progress: ProgressFn | None = None,
                 latents: torch.Tensor | None = None, cache: CacheStrategy | None = None) -> GenerationResult:
        """Run one request end to end; `latents` replaces the seeded noise (parity tests); `cache` runs instead of
        the strategy the params name (the calibration tool's recorder)."""
        resolved = self.resolve(params)
        timings: dict[str, float] = {}
        start = time.perf_counter()

        negative = resolved.negative_prompt if resolved.guided else None
        (embeddings,) = self.text_stage.run([(resolved.prompt, negative)])
        timings["text_encode"] = time.perf_counter() - start

        mark = time.perf_counter()
        job = self.denoise_stage.run_steps(self.denoise_stage.start(resolved, embeddings, latents, cache),
                                           progress=progress)
        final_latents = job.latents
        timings["denoise"] = time.perf_counter() - mark

        mark = time.perf_counter()
        frames = self.decode_stage.run(final_latents, parallel=self.mesh is not None)
        timings["decode"] = time.perf_counter() - mark
        timings["total"] = time.perf_counter() - start
        cache = job.cache.stats.as_dict() if job.cache is not None else None
        return GenerationResult(frames, resolved, timings, final_latents, cache)
