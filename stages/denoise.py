"""Stage 2: text embeddings + seed -> denoised latents, with classifier-free guidance.

The stage advances a request in chunks of steps (`run_steps`), so whoever owns the stage can
report progress, cancel or interleave requests between chunks. The per-request state
(`DenoiseJob`) holds the latents and the sampler's history and stays where the DiT runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from flexcache.hooks import NO_HOOKS
from flexcache.strategy import CacheStrategy, make_strategy
from models.attention import AttentionFn, auto_attention
from models.denoiser import BlockDenoiser
from models.family import CfgForm, GuidanceKind, LatentGeometry, ModelDescription, neutral_guidance_scale
from models.registry import describe, family_module
from parallel.mesh import ParallelMesh
from stages.embeddings import PromptEmbeddings
from stages.params import ResolvedParams
from stages.runner import BlockRunner
from stages.samplers import FlowSampler, make_sampler

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
"""Called as progress(steps_done, total_steps) after every denoising step."""


def initial_noise(params: ResolvedParams, latent: LatentGeometry) -> torch.Tensor:
    """fp32 Gaussian latents from the request's seed, drawn on the CPU so every device agrees.

    (The official Wan code draws on CUDA, whose generator gives other numbers for the same seed.)
    """
    generator = torch.Generator("cpu").manual_seed(params.seed)
    shape = latent.latent_shape(params.num_frames, params.height, params.width)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def per_token_norms(v: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """The L2 norm of each DiT token's values of a velocity (C, [F,] H, W), broadcast back to every value: the norm
    over (C, the token's patch), the last axis of the packed (tokens, C * patch) layout the DiT works in."""
    pf, ph, pw = patch
    if v.ndim == 3:
        c, h, w = v.shape
        norms = v.reshape(c, h // ph, ph, w // pw, pw).square().sum(dim=(0, 2, 4), keepdim=True).sqrt()
        return norms.expand(c, h // ph, ph, w // pw, pw).reshape(v.shape)
    c, f, h, w = v.shape
    norms = v.reshape(c, f // pf, pf, h // ph, ph, w // pw, pw).square().sum(dim=(0, 2, 4, 6), keepdim=True).sqrt()
    return norms.expand(c, f // pf, pf, h // ph, ph, w // pw, pw).reshape(v.shape)


def combine_guidance(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float, form: CfgForm = "uncond",
                     renorm_patch: tuple[int, int, int] | None = None) -> torch.Tensor:
    """True CFG: v_u + g (v_c - v_u) ("uncond") or v_c + g (v_c - v_u) ("cond", Z-Image's pipeline); with
    `renorm_patch` the result is rescaled per DiT token to the conditional velocity's norm (Qwen-Image's
    pipeline), which keeps large scales from inflating the update."""
    base = v_uncond if form == "uncond" else v_cond
    combined = base + scale * (v_cond - v_uncond)
    if renorm_patch is None:
        return combined
    return combined * (per_token_norms(v_cond, renorm_patch) / per_token_norms(combined, renorm_patch))


@dataclass
class DenoiseJob:
    """One request's denoising state between step chunks. latents: (C, F', H', W') fp32 on CPU."""

    params: ResolvedParams
    embeddings: PromptEmbeddings
    sampler: FlowSampler
    latents: torch.Tensor
    step: int = 0
    step_times: list[float] = field(default_factory=list)
    cache: CacheStrategy | None = None  # the request's feature cache and its state (params.cache)
    expert: int = 0  # the expert the last step ran (a switch resets the cache)

    @property
    def total_steps(self) -> int:
        return len(self.sampler.timesteps)

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps


class DenoiseStage:
    """Runs a family's DiT (one expert, or Wan2.2's high/low-noise pair) over the sampler's timesteps.

    guidance: how the model is guided ("cfg": two branches combined as v_u + g (v_c - v_u); "distilled":
    one branch with the scale as a model input; "none": one branch). The seeded noise takes the shape of
    the DiT class's `latent` geometry (its family's VAE latents). Every forward goes through `stages.runner.BlockRunner`; with a
    `ParallelMesh` it is spread over the mesh's ranks, and all ranks of the mesh must then drive the
    same jobs through the same calls together. teacache_signals: the model's TeaCache mode -> signal
    name (its description's `teacache`), for requests that ask for TeaCache. cfg_form, cfg_renorm and
    shift_terminal are the model's (`ModelDescription`): how the CFG branches combine, and how the flow-match
    schedule ends.
    """

    def __init__(self, experts: Sequence[BlockDenoiser], boundary: float | None = None,
                 mesh: ParallelMesh | None = None, guidance: GuidanceKind = "cfg",
                 attn_fn: AttentionFn = auto_attention, teacache_signals: Mapping[str, str] | None = None,
                 cfg_form: CfgForm = "uncond", cfg_renorm: bool = False, shift_terminal: float | None = None) -> None:
        if len(experts) not in (1, 2) or (len(experts) == 2) != (boundary is not None):
            raise ValueError("pass one expert, or two experts (high-noise first) with a boundary")
        self.experts = list(experts)
        self.latent: LatentGeometry = experts[0].latent
        self.boundary = boundary
        self.guidance = guidance
        self.attn_fn = attn_fn
        self.teacache_signals = dict(teacache_signals or {})
        self.cfg_form: CfgForm = cfg_form
        self.cfg_renorm = cfg_renorm
        self.shift_terminal = shift_terminal
        first = next(self.experts[0].parameters())  # type: ignore[attr-defined]
        self.device = first.device
        self.mesh: ParallelMesh | None = None
        self._runners = [BlockRunner(expert, None, attn_fn) for expert in self.experts]
        if mesh is not None:
            self.use_mesh(mesh)

    def use_mesh(self, mesh: ParallelMesh) -> None:
        """Spread every forward over `mesh` (set once the process group exists, after loading)."""
        self.mesh = mesh
        self._runners = [BlockRunner(expert, mesh, self.attn_fn) for expert in self.experts]

    @classmethod
    def from_pretrained(cls, model: ModelDescription | str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", attn_fn: AttentionFn = auto_attention,
                        mesh: ParallelMesh | None = None) -> "DenoiseStage":
        """The DiT(s) of a checkpoint folder (or its description), loaded by the family's factory."""
        model = model if isinstance(model, ModelDescription) else describe(model)
        experts, boundary = family_module(model.family).load_denoisers(model, dtype=dtype, device=device)
        return cls(experts, boundary, mesh, model.guidance, attn_fn,
                   {mode: calibration.signal for mode, calibration in model.teacache.items()},
                   cfg_form=model.cfg_form, cfg_renorm=model.cfg_renorm, shift_terminal=model.shift_terminal)

    def start(self, params: ResolvedParams, embeddings: PromptEmbeddings,
              latents: torch.Tensor | None = None, cache: CacheStrategy | None = None) -> DenoiseJob:
        """A job at step 0; `latents` overrides the seeded noise (used by parity tests); `cache` runs instead of
        the strategy `params.cache` names (the calibration tool's recorder)."""
        if params.guidance != self.guidance:
            raise ValueError(f"the parameters were resolved for a model with {params.guidance!r} guidance, but this "
                             f"DiT's guidance is {self.guidance!r}: resolve them against this model's description")
        if params.cfg_form != self.cfg_form:
            raise ValueError(f"the parameters were resolved for a model whose CFG form is {params.cfg_form!r}, but "
                             f"this DiT's is {self.cfg_form!r}")
        if params.guided and self.guidance == "cfg" and embeddings.negative is None:
            raise ValueError("guided denoising needs negative-prompt embeddings")
        sampler = make_sampler(params.sampler, params.num_inference_steps, params.shift, self.shift_terminal)
        noise = initial_noise(params, self.latent) if latents is None else latents.to(torch.float32)
        if cache is None:
            cache = make_strategy(params.cache, len(sampler.timesteps), self.teacache_signals, sampler.sigmas.tolist())
        return DenoiseJob(params, embeddings, sampler, noise, cache=cache)

    def _expert_and_guidance(self, timestep: float, params: ResolvedParams) -> tuple[int, float]:
        if self.boundary is None or timestep >= self.boundary * 1000:
            return 0, params.guidance_scale
        return 1, params.guidance_scale_2

    @torch.inference_mode()
    def velocity(self, job: DenoiseJob, timestep: torch.Tensor) -> torch.Tensor:
        """The model's velocity at one timestep; under CFG the branches' `combine_guidance`, from one batched
        forward of both branches."""
        expert, scale = self._expert_and_guidance(float(timestep), job.params)
        if expert != job.expert and job.cache is not None:
            job.cache.reset()  # the other expert's activations are not comparable with this one's
        job.expert = expert
        x = job.latents.to(self.device)[None]
        branches = [job.embeddings.positive]
        if self.guidance == "cfg" and scale != neutral_guidance_scale(self.cfg_form):
            branches.append(job.embeddings.negative)  # type: ignore[arg-type]  # checked in start
        batch = len(branches)
        t = timestep.to(self.device).reshape(1).expand(batch)
        guidance = torch.full((batch,), scale, device=self.device) if self.guidance == "distilled" else None
        conditioning = [c.to(self.device) for c in branches]
        hooks = job.cache if job.cache is not None else NO_HOOKS
        v = self._runners[expert](x.expand(batch, *x.shape[1:]), t, conditioning, guidance, hooks=hooks,
                                  step=job.step).float()
        if batch == 1:
            return v[0]
        return combine_guidance(v[0], v[1], scale, self.cfg_form, self.latent.patch if self.cfg_renorm else None)

    def run_steps(self, job: DenoiseJob, max_steps: int | None = None,
                  progress: ProgressFn | None = None) -> DenoiseJob:
        """Advance `job` by up to `max_steps` steps (all remaining when None)."""
        end = job.total_steps if max_steps is None else min(job.total_steps, job.step + max_steps)
        while job.step < end:
            start = time.perf_counter()
            timestep = job.sampler.timesteps[job.step]
            v = self.velocity(job, timestep).cpu()
            job.latents = job.sampler.step(v, job.step, job.latents)
            job.step += 1
            job.step_times.append(time.perf_counter() - start)
            if progress is not None:
                progress(job.step, job.total_steps)
        return job

    def run(self, params: ResolvedParams, embeddings: PromptEmbeddings,
            progress: ProgressFn | None = None, latents: torch.Tensor | None = None) -> torch.Tensor:
        """All steps at once; returns the final latents (C, F', H', W') fp32 on CPU."""
        job = self.run_steps(self.start(params, embeddings, latents), progress=progress)
        return job.latents
