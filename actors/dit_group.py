"""The DiT rank group: `world_size` rank actors forming one torch.distributed group.

Each rank loads the denoiser in its own process and keeps the per-request `DenoiseJob`s
(latents + sampler history) in memory, so between runs only ids and step counts travel;
embeddings go in once, final latents come out once. The engine drives a job through
`DiTGroup.run_steps`, which issues the same call to every rank at once: by default one call runs
every step that is left, and rank 0 streams an event per step back on that call (a Ray streaming
generator), so progress stays per step without a round trip per step. Cancellation and priority
preemption reach the running ranks out of band (`DiTGroup.stop`, two rounds of control calls in their
own concurrency group, actors/step_control.py) and stop every rank at the same step boundary.

Each request is spread over the ranks by the group's `ParallelLayout` (cfg x ring x ulysses,
parallel/): the layout is resolved and validated here before any actor starts (a bad layout fails
in milliseconds with the reason, not after minutes of weight loading), and every rank builds its
`ParallelMesh` once the process group exists. Every rank ends each step with the same full latents
(parallel.dit), so any rank could return them; rank 0 does. At the end of each run
the ranks run ONE small all_reduce that checks they stand at the same step and that none failed
(group checks at run boundaries, never a per-step barrier); a job's first run also starts with
one, later runs rely on the previous end check. Every rank enters
that collective even when its own run raised, so an error after the run's last collective
fails all ranks together and the group lives on. An error inside a forward (out of memory on one
GPU) leaves the others in that forward's collective instead: the failed rank reports its error
before the end check (`run_steps` yields it at once), and the group is broken once the others
have not finished `dit.fault_grace_s` later; a run that outlives its steps x
`dit.step_timeout_s` breaks it too (rank_group.py).

The generic group machinery (placement group, rendezvous, init on all ranks at once, ping in
its own concurrency group, group-wide failure, the GPU environment) lives in actors/rank_group.py:
`DiTGroup` is a `RankGroup` and `DiTRankActor` a `RankActor` that builds its mesh in
`on_group_ready`. A dead rank breaks the whole group and raises `StageActorDied("denoise", ...)`;
`restart()` rebuilds it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np
import ray

from actors.config import ServiceConfig
from actors.errors import StageActorDied, StageStartError, error_headline
from actors.rank_group import CONTROL_GROUP, Failed, Progress, RankActor, RankGroup
from actors.stage_actors import ConditioningArrays, resolve_dtype, resolve_model_folder
from actors.step_control import StepControls
from models import registry
from parallel.mesh import LayoutError, ParallelLayout, resolve_layout

if TYPE_CHECKING:
    from stages.denoise import DenoiseJob

logger = logging.getLogger(__name__)

STAGE = "denoise"


class DiTRankActor(RankActor):
    """One rank of a DiT group: the denoiser, this rank's job states, and its process-group membership."""

    def __init__(self, rank: int, world_size: int, model: str, dtype: str, device: str,
                 layout: tuple[int, int, int] = (1, 1, 1)) -> None:
        """model: checkpoint folder; dtype: "auto"/"fp32"/"bf16"; device: "cpu" or "cuda" (bound to Ray's GPU);
        layout: (cfg_degree, ring_degree, ulysses_degree), already validated by DiTGroup.

        torch is imported here, after Ray has set this process's environment (rank_group.GPU_RANK_ENV).
        """
        from stages.denoise import DenoiseStage

        self._init_rank(rank, world_size, device)
        self.layout = layout
        folder = resolve_model_folder(model)
        torch_dtype = resolve_dtype(dtype, device)
        self._stage = DenoiseStage.from_pretrained(folder, dtype=torch_dtype, device=self.device)
        self._jobs: dict[str, DenoiseJob] = {}
        self._agreed: dict[str, int] = {}  # job id -> the step at which the last end-of-run check agreed
        self._controls = StepControls()
        logger.info("DiT rank %d/%d loaded %s (%s on %s, pid %d)", rank, world_size, folder, torch_dtype,
                    self.device, os.getpid())

    def on_group_ready(self) -> dict[str, Any]:
        """Spread the denoiser over this group's `ParallelMesh` (cfg x ring x ulysses)."""
        from parallel.mesh import ParallelLayout, ParallelMesh

        layout = ParallelLayout(*self.layout)
        if layout.world_size > 1:
            mesh = ParallelMesh.build(layout)
            assert mesh is not None
            self._stage.use_mesh(mesh)
        return {"layout": str(layout)}

    # ---- jobs ---------------------------------------------------------------------------------

    def start(self, job_id: str, params: dict[str, Any], positive: ConditioningArrays,
              negative: ConditioningArrays | None, latents: np.ndarray | None = None) -> int:
        """Create a job at step 0 from resolved params and the prompts' conditioning (named float32 arrays,
        `Conditioning.to_numpy`); returns its total steps.

        latents (C, F', H', W') replaces the seeded noise (parity tests).
        """
        import torch

        from models.conditioning import Conditioning
        from stages.embeddings import PromptEmbeddings
        from stages.params import ResolvedParams

        if job_id in self._jobs:
            raise ValueError(f"job {job_id!r} already exists on rank {self.rank}; drop it before starting it again")
        self._bind_device()
        resolved = ResolvedParams.model_validate(params)
        embeddings = PromptEmbeddings(Conditioning.from_numpy(positive),
                                      None if negative is None else Conditioning.from_numpy(negative))
        noise = None if latents is None else torch.tensor(latents, dtype=torch.float32)
        job = self._stage.start(resolved, embeddings, noise)
        self._jobs[job_id] = job
        return job.total_steps

    def run_steps(self, job_id: str, max_steps: int, run_id: int = 0,
                  events: bool = False) -> Iterator[Progress | Failed | dict[str, Any]]:
        """Advance a job by up to max_steps, or to the stop step the engine sets meanwhile (`hold` / `stop_at`).

        A Ray streaming call: with `events`, yields Progress({"step", "total", "seconds", "cache"}) after every step;
        yields Failed(headline) as soon as this rank's steps failed; last {"step", "total", "done",
        "step_times", "cache"} (this run's seconds per step), or it raises. run_id numbers the job's runs
        (dispatches), so a stop request for an earlier run cannot stop this one.

        With world_size > 1 the run ends with one small all_reduce check, entered by every rank even
        after an error: that no rank failed and all reached the same step. A job's first run also
        starts with one, that every rank knows the job, stands at the same step and runs the same
        number of steps (the forwards contain collectives, so a disagreement must stop the run before
        they start); later runs rely on the previous run's end check instead. A rank whose forward
        failed inside a collective never meets the others at the end check, which is why it reports
        first: the group then stops waiting (DiTGroup, fault_grace_s).
        """
        if max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        self._bind_device()
        error: Exception | None = None
        job: DenoiseJob | None = None
        first = 0
        try:
            job = self._job(job_id)
            first = job.step
        except Exception as exc:  # noqa: BLE001  # re-raised below, after the group check
            error = exc
        if self.world_size > 1 and (job is None or self._agreed.get(job_id) != first):
            self._agree(job_id, "at the start of the chunk", {"step": first, "steps": max_steps},
                        failed=error is not None)
        if error is not None:
            raise error  # every other rank raised in the check above: nobody waits at the end check
        assert job is not None
        control = self._controls.get(job_id, run_id, first)
        if control is None:
            raise ValueError(f"job {job_id!r}: run {run_id} is older than the job's latest run on rank {self.rank}")
        end = min(job.total_steps, first + max_steps)
        try:
            while job.step < end and control.proceed():
                self._stage.run_steps(job, 1)
                control.stepped()
                if events:
                    yield Progress(self._progress(job))
        except Exception as exc:  # noqa: BLE001  # re-raised below, after the group check
            error = exc
            logger.error("rank %d: job %s failed in its run: %s", self.rank, job_id, error_headline(exc))
        finally:
            control.ended()
        if error is not None:
            yield Failed(error_headline(error))
        if self.world_size > 1:
            self._agree(job_id, "at the end of the chunk", {"step": job.step}, failed=error is not None)
        if error is not None:
            raise error
        self._agreed[job_id] = job.step  # set on every rank or on none: the check raised on all of them or none
        yield {"step": job.step, "total": job.total_steps, "done": job.done, "step_times": job.step_times[first:],
               "cache": job.cache.stats.as_dict() if job.cache is not None else None}

    @staticmethod
    def _progress(job: "DenoiseJob") -> dict[str, Any]:
        """A step event: {"step", "total", "seconds" (of that step), "cache" (counts so far, or None)}."""
        return {"step": job.step, "total": job.total_steps, "seconds": job.step_times[-1],
                "cache": job.cache.stats.as_dict() if job.cache is not None else None}

    def hold(self, job_id: str, run_id: int) -> int | None:
        """Control call (CONTROL_GROUP): run `run_id` of the job starts no step after its next boundary; returns
        that boundary's step, or None when the job is unknown here or the run is stale (actors/step_control.py)."""
        job = self._jobs.get(job_id)
        control = None if job is None else self._controls.get(job_id, run_id, job.step)
        return None if control is None else control.hold()

    def stop_at(self, job_id: str, run_id: int, step: int) -> None:
        """Control call (CONTROL_GROUP): run `run_id` of the job stops once `step` steps are done."""
        job = self._jobs.get(job_id)
        control = None if job is None else self._controls.get(job_id, run_id, job.step)
        if control is not None:
            control.stop_at(step)

    def _agree(self, job_id: str, when: str, named: dict[str, int], failed: bool) -> None:
        """One all_reduce(MAX) of (values, -values, failed): raises on every rank unless all ranks hold the
        same values and none failed (a failed rank re-raises its own error instead)."""
        values = list(named.values())
        import torch
        import torch.distributed as dist

        if self._group is None:
            raise RuntimeError(f"rank {self.rank} of {self.world_size} has no process group; "
                               f"call init_process_group first")
        backend = self._group["backend"]
        flags = torch.tensor([*values, *(-v for v in values), int(failed)], dtype=torch.int64,
                             device=self._comm_device(backend))
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        n = len(values)
        high, low, any_failed = flags[:n].tolist(), [-int(v) for v in flags[n:2 * n]], int(flags[-1])
        if any_failed:
            if not failed:
                raise RuntimeError(f"job {job_id!r}: another rank failed {when} (rank {self.rank} holds {named})")
            return
        if high != low:
            ranges = ", ".join(f"{name} {lo}..{hi}" for name, lo, hi in zip(named, low, high) if lo != hi)
            raise RuntimeError(f"job {job_id!r}: ranks disagree {when} ({ranges}); the group is inconsistent "
                               f"and must be restarted")

    def result(self, job_id: str) -> tuple[list[int], np.ndarray]:
        """The finished job's latents (C, F', H', W') float32, after their shape; the job is dropped.

        Called with num_returns=2, so the two are separate objects: the caller awaits the shape (to learn
        that the call succeeded) and hands the latents on by reference, without fetching them.
        """
        job = self._job(job_id)
        if not job.done:
            raise ValueError(f"job {job_id!r} is at step {job.step} of {job.total_steps}; run the remaining steps "
                             f"before asking for the result")
        self._forget(job_id)
        latents = job.latents.detach().to("cpu").float().numpy()
        return list(latents.shape), latents

    def drop(self, job_id: str) -> None:
        """Forget a job (cancellation or cleanup); dropping an unknown job is fine."""
        self._forget(job_id)

    def _forget(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        self._agreed.pop(job_id, None)
        self._controls.forget(job_id)

    def jobs(self) -> list[str]:
        return list(self._jobs)

    def _job(self, job_id: str) -> "DenoiseJob":
        try:
            return self._jobs[job_id]
        except KeyError:
            raise KeyError(f"unknown job {job_id!r} on rank {self.rank}; start it first (known: "
                           f"{sorted(self._jobs)})") from None


class DiTGroup(RankGroup):
    """A group of `cfg.dit.world_size` DiTRankActors in one STRICT_PACK placement group, driven from asyncio."""

    def __init__(self, cfg: ServiceConfig, group_index: int = 0, model: str | None = None,
                 actor_cls: type[DiTRankActor] = DiTRankActor) -> None:
        """model: checkpoint folder; None = cfg.model (None there too: the embedded default model);
        actor_cls: the rank class (a subclass in fault-injection tests)."""
        self.cfg = cfg
        self.group_index = group_index
        self._model_arg = model if model is not None else cfg.model
        self.layout: ParallelLayout | None = None
        self._run_ids: dict[str, int] = {}  # job id -> its latest run's number (a stop names the run it stops)
        self._running: dict[str, int] = {}  # job id -> the run going on now
        self._stopping: dict[str, asyncio.Future[int | None]] = {}
        dit = cfg.dit
        super().__init__(stage=STAGE, kind="DiT", index=group_index, actor_cls=actor_cls,
                         world_size=dit.world_size, num_cpus=dit.num_cpus, num_gpus=dit.num_gpus,
                         device=cfg.actor_device(dit.num_gpus), init_timeout_s=dit.init_timeout_s, section="dit",
                         fault_grace_s=dit.fault_grace_s, health_timeout_s=dit.health_check_timeout_s)

    async def _rank_args(self) -> tuple[Any, ...]:
        """(model folder, dtype, device, layout degrees), with the layout resolved and validated first."""
        model = str(await asyncio.to_thread(resolve_model_folder, self._model_arg))
        self.layout = await asyncio.to_thread(self._resolve_layout, model)
        degrees = (self.layout.cfg_degree, self.layout.ring_degree, self.layout.ulysses_degree)
        return model, self.cfg.dtype, self.device, degrees

    def describe(self) -> str:
        return f"layout {self.layout}"

    def _resolve_layout(self, model: str) -> ParallelLayout:
        """The configured (or automatic) layout for this model, or StageStartError saying why it cannot run."""
        described = registry.describe(model)
        dit = self.cfg.dit
        try:
            return resolve_layout(self.world_size, described.num_heads, described.guided_by_default, dit.cfg_degree,
                                  dit.ring_degree, dit.ulysses_degree, guidance=described.guidance)
        except LayoutError as exc:
            raise StageStartError(STAGE, f"DiT group {self.group_index}: {exc}") from None

    # ---- jobs ---------------------------------------------------------------------------------

    async def begin(self, job_id: str, params: Mapping[str, Any], positive: ConditioningArrays | ray.ObjectRef,
                    negative: ConditioningArrays | ray.ObjectRef | None, latents: np.ndarray | None = None) -> int:
        """Create the job on every rank from ResolvedParams fields and the prompts' conditioning (arrays, or
        references to them in the object store); returns total steps."""
        self._check_usable()
        if hasattr(params, "model_dump"):
            params = params.model_dump()  # a ResolvedParams instance
        # One object-store copy of each array for all ranks (references from the text-encoder pool already are).
        args = [a if a is None or isinstance(a, ray.ObjectRef) else ray.put(a) for a in (positive, negative, latents)]
        refs = [r.start.remote(job_id, dict(params), *args) for r in self._ranks]
        try:
            totals = await self._gather(refs, f"start({job_id})", **self._budget(1))
        except StageActorDied:
            raise
        except Exception:
            await self._drop_everywhere(job_id)  # some ranks may have created it
            raise
        return int(totals[0])

    async def run_steps(self, job_id: str, max_steps: int,
                        on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Advance the job by up to max_steps on all ranks (fewer when `stop` is called meanwhile); returns rank
        0's {"step", "total", "done", "step_times", "cache"}. on_step gets rank 0's {"step", "total", "seconds",
        "cache"} after every step, streamed while the run goes on (no call per step)."""
        self._check_usable()
        run_id = self._run_ids[job_id] = self._run_ids.get(job_id, 0) + 1
        self._running[job_id] = run_id
        streams = [r.run_steps.remote(job_id, max_steps, run_id, i == 0 and on_step is not None)
                   for i, r in enumerate(self._ranks)]
        forward = None if on_step is None else (lambda rank, payload: on_step(payload))
        try:
            return (await self._gather(streams, f"run_steps({job_id})", on_progress=forward,
                                       **self._budget(max_steps)))[0]
        finally:
            self._running.pop(job_id, None)

    async def stop(self, job_id: str) -> int | None:
        """Stop the job's running `run_steps` at the first step boundary all ranks can reach together; returns
        that step (the run then returns there, not done), or None when no run of the job is going on.

        Two rounds of control calls, answered beside the run (actors/step_control.py): every rank holds at its
        next boundary and says which; then every rank gets the largest, runs on to it and stops. No collective.
        Concurrent stops of one job share the first one's rounds.
        """
        if job_id not in self._running or self._broken is not None:
            return None
        pending = self._stopping.get(job_id)
        if pending is None:
            pending = self._stopping[job_id] = asyncio.ensure_future(self._stop_rounds(job_id, self._running[job_id]))
            pending.add_done_callback(lambda _: self._stopping.pop(job_id, None))
        return await asyncio.shield(pending)

    async def _stop_rounds(self, job_id: str, run_id: int) -> int | None:
        budget = {"budget_s": self._health_timeout_s, "budget_key": "dit.health_check_timeout_s"}
        control = [r.hold.options(concurrency_group=CONTROL_GROUP) for r in self._ranks]
        boundaries = await self._gather([call.remote(job_id, run_id) for call in control], f"hold({job_id})",
                                        **budget)
        known = [b for b in boundaries if b is not None]
        if not known:
            return None
        step = max(known)
        await self._gather([r.stop_at.options(concurrency_group=CONTROL_GROUP).remote(job_id, run_id, step)
                            for r in self._ranks], f"stop_at({job_id})", **budget)
        logger.info("%s: job %s stops at step %d", self.label, job_id, step)
        return step

    async def result_ref(self, job_id: str) -> ray.ObjectRef:
        """The finished job's latents (C, F', H', W') float32 from rank 0, as a reference into the object store
        (the engine hands it to the VAE without fetching it); the job is dropped on every rank."""
        self._check_usable()
        shape, latents = self._ranks[0].result.options(num_returns=2).remote(job_id)
        await self._gather([shape], f"result({job_id})", **self._budget(1))
        await self._drop_everywhere(job_id, first_rank=1)
        self._run_ids.pop(job_id, None)
        return latents

    async def result(self, job_id: str) -> np.ndarray:
        """`result_ref`'s latents, fetched."""
        return await (await self.result_ref(job_id))

    async def drop(self, job_id: str) -> None:
        """Cancel: forget the job on every rank. Idempotent, and it never raises for a dead rank (the job
        died with it): the group is then marked broken and the next call raises StageActorDied.
        """
        self._run_ids.pop(job_id, None)
        if self._broken is not None or not self._ranks:
            return  # a broken or stopped group holds no jobs
        try:
            await self._drop_everywhere(job_id)
        except StageActorDied as exc:
            logger.warning("drop(%s): %s", job_id, exc)

    # ---- fan-out ------------------------------------------------------------------------------

    def _budget(self, steps: int) -> dict[str, Any]:
        """The time a call covering `steps` denoising steps may take before the group counts as hung."""
        return {"budget_s": steps * self.cfg.dit.step_timeout_s,
                "budget_key": f"{steps} x dit.step_timeout_s" if steps > 1 else "dit.step_timeout_s"}

    async def _drop_everywhere(self, job_id: str, first_rank: int = 0) -> None:
        targets = self._ranks[first_rank:]
        if targets:
            await self._gather([r.drop.remote(job_id) for r in targets], f"drop({job_id})", first_rank,
                               **self._budget(1))
