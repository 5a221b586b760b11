"""The stage engine: moves jobs through the text-encoder pool, the DiT groups and the VAE pool.

One asyncio loop owns everything: the `StageScheduler` policy (which job next, per stage), the
durable `JobStore`, and one worker coroutine per stage actor (per DiT group), so text encoding,
denoising and decoding of different jobs run at the same time on different pools. Denoising
is dispatched in chunks of steps: between chunks the engine publishes progress, honours
cancellation (all ranks of a group stop at the same step) and lets higher-priority jobs in.

Used by the Serve ingress (serve_app.py) and by the batch runner (actors/batch.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Mapping, Protocol

import numpy as np

from actors.config import ServiceConfig
from actors.dit_group import DiTGroup
from actors.errors import StageActorDied
from actors.job_store import TERMINAL_STATUSES, JobRecord, JobStore
from actors.pool import GroupPool, StagePool
from actors.resources import ClusterResources, check_fits, fit_to_cluster, placement_plan
from actors.scheduler import QueueFull, StageScheduler
from actors.stage_actors import TextEncoderActor, VAEDecoderActor
from actors.vae_group import VAEGroup
from models.wan.checkpoint import WanCheckpoint
from models.wan.default_model import resolve_model_path
from stages.media import output_suffix
from stages.params import GenerationParams, ResolvedParams

logger = logging.getLogger(__name__)

__all__ = ["EngineMetrics", "JobNotFound", "QueueFull", "StageEngine"]


class JobNotFound(KeyError):
    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"no job with id {self.job_id!r}"


class EngineMetrics(Protocol):
    """What the engine reports; the Serve app implements it with ray.serve.metrics."""

    def stage_latency(self, stage: str, seconds: float) -> None: ...
    def queue_depths(self, depths: Mapping[str, int]) -> None: ...
    def denoise_steps(self, steps: int) -> None: ...
    def job_finished(self, status: str) -> None: ...


class NullMetrics:
    def stage_latency(self, stage: str, seconds: float) -> None:
        pass

    def queue_depths(self, depths: Mapping[str, int]) -> None:
        pass

    def denoise_steps(self, steps: int) -> None:
        pass

    def job_finished(self, status: str) -> None:
        pass


@dataclass
class _Embeddings:
    positive: np.ndarray
    negative: np.ndarray | None


class StageEngine:
    """Accepts jobs, records them durably and runs them through the three stage pools."""

    def __init__(self, cfg: ServiceConfig, store: JobStore | None = None,
                 metrics: EngineMetrics | None = None) -> None:
        """Unset num_cpus are fitted to the running Ray cluster, and a configuration that cannot fit it
        raises ResourcesDoNotFit here, before anything is reserved (actors/resources.py)."""
        cluster = ClusterResources.current()
        self.cfg = cfg = fit_to_cluster(cfg, cluster)
        check_fits(placement_plan(cfg), cluster)
        self.model_path = resolve_model_path(cfg.model)
        self.checkpoint = WanCheckpoint.resolve(self.model_path)
        self.preset = self.checkpoint.preset
        self.store = store or JobStore(cfg.job_store)
        self.metrics: EngineMetrics = metrics or NullMetrics()
        self.scheduler = StageScheduler(cfg.scheduler.max_pending_jobs)
        self.output_dir = Path(cfg.output_dir)
        self.ready = False

        model = str(self.model_path)
        te, vae = cfg.text_encoder, cfg.vae
        self.text_pool = StagePool("text_encode", TextEncoderActor,
                                   (model, cfg.dtype, cfg.actor_device(te.num_gpus)), {}, te,
                                   init_timeout_s=cfg.dit.init_timeout_s)
        # vae.patch_parallel > 1: each decode replica is a group of ranks that decode strips (same interface).
        self.vae_pool: StagePool | GroupPool = (
            GroupPool("decode", [VAEGroup(cfg, i, model=model) for i in range(vae.replicas)])
            if vae.patch_parallel > 1 else
            StagePool("decode", VAEDecoderActor, (model, cfg.actor_device(vae.num_gpus)), {}, vae,
                      init_timeout_s=cfg.dit.init_timeout_s))
        logger.info("decode pool: %d replicas, %s", vae.replicas,
                    f"each a patch-parallel group of {vae.patch_parallel} VAE ranks" if vae.patch_parallel > 1
                    else "each one VAE actor")
        self.dit_groups = [DiTGroup(cfg, i, model=model) for i in range(cfg.dit.groups)]

        self._embeddings: dict[str, _Embeddings] = {}
        self._latents: dict[str, np.ndarray] = {}
        self._owner: dict[str, int] = {}  # job id -> DiT group holding its denoising state
        self._subscribers: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}
        self._changed: asyncio.Condition | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start every pool and group (concurrently), recover unfinished jobs, start the workers."""
        self._changed = asyncio.Condition()
        await self.store.take_ownership(self.cfg.job_store_lock_timeout_s)  # one engine per store at a time
        started = time.perf_counter()
        await asyncio.gather(self.text_pool.start(), self.vae_pool.start(), *(g.start() for g in self.dit_groups))
        logger.info("stage pools ready in %.1f s (text %d, DiT %d x %d ranks, VAE %d x %d ranks)",
                    time.perf_counter() - started, self.text_pool.size, len(self.dit_groups),
                    self.cfg.dit.world_size, self.vae_pool.size, self.cfg.vae.patch_parallel)
        self._recover()
        workers = [self._encode_worker() for _ in range(self.text_pool.size)]
        workers += [self._denoise_worker(i) for i in range(len(self.dit_groups))]
        workers += [self._decode_worker() for _ in range(self.vae_pool.size)]
        self._workers = [asyncio.create_task(w) for w in workers]
        self.ready = True
        await self._notify()

    async def shutdown(self) -> None:
        self.ready = False
        self._stopping = True
        for task in self._workers:
            task.cancel()
        if self._workers:
            await asyncio.wait(self._workers, timeout=10)
        await asyncio.gather(self.text_pool.shutdown(), self.vae_pool.shutdown(),
                             *(g.shutdown() for g in self.dit_groups), return_exceptions=True)
        self.store.release_ownership()

    def _recover(self) -> None:
        """Jobs a previous run accepted but did not finish: re-queue them, or fail them with the reason."""
        for record in self.store.unfinished():
            if not self.cfg.resume_unfinished:
                self._fail(record.id, "the service restarted before this job finished (resume_unfinished is off)")
                continue
            try:
                self.scheduler.submit(record.id, record.priority)
            except QueueFull:
                self._fail(record.id, "the service restarted and its queue was full; submit the job again")
                continue
            self.store.update(record.id, status="queued", step=0)
            logger.info("resumed unfinished job %s (was %s)", record.id, record.status)

    # ------------------------------------------------------------------ public API
    def resolve(self, params: GenerationParams | Mapping[str, Any]) -> ResolvedParams:
        """Validate (pydantic.ValidationError names the field) and fill the model's defaults."""
        if not isinstance(params, GenerationParams):
            params = GenerationParams.model_validate(params)
        return params.resolve(self.preset.defaults, self.preset.guidance_scale_2)

    async def submit(self, params: GenerationParams | Mapping[str, Any], *, priority: int = 0, kind: str = "video",
                     key: str | None = None) -> JobRecord:
        """Accept a job (recorded durably before this returns) or raise QueueFull / ValidationError."""
        resolved = self.resolve(params)
        if self.scheduler.pending >= self.cfg.scheduler.max_pending_jobs:
            raise QueueFull(self.scheduler.pending, self.cfg.scheduler.max_pending_jobs)
        record = self.store.create(resolved.model_dump(), kind=kind, priority=priority, key=key)
        self.scheduler.submit(record.id, priority)
        self._publish(record)
        await self._notify()
        return record

    async def generate(self, params: GenerationParams | Mapping[str, Any], *, priority: int = 0,
                       kind: str = "video", timeout_s: float | None = None) -> JobRecord:
        """Submit and wait for the final record."""
        record = await self.submit(params, priority=priority, kind=kind)
        return await self.wait(record.id, timeout_s)

    def status(self, job_id: str) -> JobRecord:
        record = self.store.get(job_id)
        if record is None:
            raise JobNotFound(job_id)
        return record

    async def wait(self, job_id: str, timeout_s: float | None = None) -> JobRecord:
        async def until_done() -> JobRecord:
            async for _ in self.events(job_id):
                pass
            return self.status(job_id)
        return await asyncio.wait_for(until_done(), timeout_s)

    async def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued job at once; a running one stops at its next chunk boundary."""
        record = self.status(job_id)
        if record.done:
            return record
        outcome = self.scheduler.cancel(job_id)
        if outcome in ("removed", "unknown"):
            owner = self._owner.get(job_id)
            if owner is not None:  # cancelled between chunks: free its state in the DiT group
                await self.dit_groups[owner].drop(job_id)
            self._finish(job_id, "cancelled")
        await self._notify()
        return self.status(job_id)

    def delete(self, job_id: str) -> None:
        """Forget a finished job and delete its files (unfinished jobs must be cancelled first)."""
        record = self.status(job_id)
        if not record.done:
            raise ValueError(f"job {job_id} is {record.status}; cancel it before deleting it")
        for path in (record.result_path, record.sidecar_path):
            if path:
                Path(path).unlink(missing_ok=True)
        self.store.delete(job_id)

    async def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """The job's current state, then every change (stage, denoising step) until it is final."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subscribers.setdefault(job_id, set()).add(queue)
        try:
            event = self._event(self.status(job_id))
            yield event
            while event["status"] not in TERMINAL_STATUSES:
                event = await queue.get()
                yield event
        finally:
            subscribers = self._subscribers.get(job_id)
            if subscribers is not None:
                subscribers.discard(queue)
                if not subscribers:
                    self._subscribers.pop(job_id, None)

    def snapshot(self) -> dict[str, Any]:
        return {"ready": self.ready, "queues": self.scheduler.snapshot(), "model": str(self.model_path),
                "preset": self.preset.name}

    # ------------------------------------------------------------------ bookkeeping
    @staticmethod
    def _event(record: JobRecord) -> dict[str, Any]:
        return {"id": record.id, "status": record.status, "progress": round(record.progress, 4),
                "step": record.step, "total_steps": record.total_steps, "error": record.error}

    def _publish(self, record: JobRecord) -> None:
        event = self._event(record)
        for queue in self._subscribers.get(record.id, ()):
            queue.put_nowait(event)

    def _update(self, job_id: str, **fields: Any) -> JobRecord:
        record = self.store.update(job_id, **fields)
        self._publish(record)
        return record

    def _stage_started(self, job_id: str, stage: str, status: str) -> None:
        self.store.mark_stage(job_id, stage, start=True)
        self._update(job_id, status=status)

    def _stage_finished(self, job_id: str, stage: str) -> None:
        start, end = self.store.mark_stage(job_id, stage, start=False).stage_times[stage]
        self.store.update(job_id, timings={stage: end - start})
        self.metrics.stage_latency(stage, end - start)

    def _finish(self, job_id: str, status: str, **fields: Any) -> None:
        self.scheduler.finish(job_id)
        self._embeddings.pop(job_id, None)
        self._latents.pop(job_id, None)
        self._owner.pop(job_id, None)
        self._update(job_id, status=status, **fields)
        self.metrics.job_finished(status)

    def _fail(self, job_id: str, error: str) -> None:
        logger.warning("job %s failed: %s", job_id, error)
        self._finish(job_id, "failed", error=error)

    def _retry_or_fail(self, job_id: str, stage: str, exc: StageActorDied) -> None:
        attempts = self.status(job_id).attempts + 1
        if attempts >= self.cfg.scheduler.max_attempts:
            self._fail(job_id, f"{exc} (gave up after {attempts} attempts)")
            return
        logger.warning("job %s: %s; retrying %s (attempt %d)", job_id, exc, stage, attempts + 1)
        self.store.update(job_id, attempts=attempts)
        self.scheduler.retry(job_id, stage)

    async def _notify(self) -> None:
        assert self._changed is not None, "start() the engine first"
        self.metrics.queue_depths({s: self.scheduler.depth(s) for s in ("encode", "denoise", "decode")})
        async with self._changed:
            self._changed.notify_all()

    async def _wait_for_work(self) -> None:
        assert self._changed is not None
        async with self._changed:
            try:
                # asyncio.timeout, not wait_for: wait_for can swallow a cancellation on 3.11
                async with asyncio.timeout(1.0):
                    await self._changed.wait()
            except TimeoutError:
                pass

    def _params(self, job_id: str) -> ResolvedParams:
        return ResolvedParams.model_validate(self.status(job_id).params)

    # ------------------------------------------------------------------ stage workers
    async def _encode_worker(self) -> None:
        while not self._stopping:
            batch = self.scheduler.take_encode(self.cfg.scheduler.text_batch_size)
            if not batch:
                await self._wait_for_work()
                continue
            await self._encode(batch)
            await self._notify()

    async def _encode(self, batch: list[str]) -> None:
        params = {job_id: self._params(job_id) for job_id in batch}
        for job_id in batch:
            self._stage_started(job_id, "text_encode", "encoding")
        requests = [(p.prompt, p.negative_prompt if p.guided else None) for p in params.values()]
        try:
            outputs = await self.text_pool.call("encode", requests)
        except StageActorDied as exc:
            for job_id in batch:
                self._retry_or_fail(job_id, "encode", exc)
            return
        except Exception as exc:  # noqa: BLE001 - the job fails with the reason, the service goes on
            for job_id in batch:
                self._fail(job_id, f"text encoding failed: {exc}")
            return
        for job_id, (positive, negative) in zip(batch, outputs):
            self._stage_finished(job_id, "text_encode")
            if self.scheduler.is_cancelled(job_id):
                self._finish(job_id, "cancelled")
                continue
            self._embeddings[job_id] = _Embeddings(positive, negative)
            self.scheduler.encoded(job_id)

    async def _denoise_worker(self, group_index: int) -> None:
        group = self.dit_groups[group_index]
        while not self._stopping:
            job_id = self.scheduler.take_denoise(
                lambda j: self._owner.get(j, group_index) == group_index)
            if job_id is None:
                await self._wait_for_work()
                continue
            await self._denoise_chunk(group_index, group, job_id)
            await self._notify()

    async def _denoise_chunk(self, group_index: int, group: DiTGroup, job_id: str) -> None:
        try:
            if self.scheduler.is_cancelled(job_id):
                if job_id in self._owner:
                    await group.drop(job_id)
                self._finish(job_id, "cancelled")
                return
            if job_id not in self._owner:
                embeddings = self._embeddings[job_id]
                total = await group.begin(job_id, self._params(job_id).model_dump(), embeddings.positive,
                                          embeddings.negative)
                self._owner[job_id] = group_index
                self._stage_started(job_id, "denoise", "denoising")
                self._update(job_id, step=0, total_steps=total)
            out = await group.run_steps(job_id, self.cfg.dit.chunk_steps)
            self.metrics.denoise_steps(len(out["step_times"]))
            self._update(job_id, step=out["step"], total_steps=out["total"])
            if not out["done"]:
                self.scheduler.chunk_done(job_id, finished=False)
                return
            self._latents[job_id] = await group.result(job_id)
            self._owner.pop(job_id, None)
            self._stage_finished(job_id, "denoise")
            self.scheduler.chunk_done(job_id, finished=True)
        except StageActorDied as exc:
            self._owner.pop(job_id, None)
            self._retry_or_fail(job_id, "denoise", exc)
            # every job whose state lived in this group is lost with it: restart their denoising
            for other, owner in list(self._owner.items()):
                if owner == group_index:
                    self._owner.pop(other)
            await self._restart_group(group)
        except Exception as exc:  # noqa: BLE001
            self._owner.pop(job_id, None)
            self._fail(job_id, f"denoising failed: {exc}")
            await group.drop(job_id)

    async def _restart_group(self, group: DiTGroup) -> None:
        try:
            await group.restart()
        except Exception:  # noqa: BLE001 - keep serving on the other groups; retried on the next job
            logger.exception("rebuilding DiT group failed")

    async def _decode_worker(self) -> None:
        while not self._stopping:
            job_id = self.scheduler.take_decode()
            if job_id is None:
                await self._wait_for_work()
                continue
            await self._decode(job_id)
            await self._notify()

    async def _decode(self, job_id: str) -> None:
        params = self._params(job_id)
        record = self.status(job_id)
        self._stage_started(job_id, "decode", "decoding")
        path = self.output_dir.resolve() / f"{job_id}{output_suffix(params.num_frames)}"
        sidecar = {"id": job_id, "model": str(self.model_path), "preset": self.preset.name,
                   "params": params.model_dump(), "created_at": record.created_at,
                   "timings_s": self.status(job_id).timings}
        try:
            result = await self.vae_pool.call("decode", self._latents[job_id], str(path), params.fps, sidecar)
        except StageActorDied as exc:
            self._retry_or_fail(job_id, "decode", exc)
            return
        except Exception as exc:  # noqa: BLE001
            self._fail(job_id, f"decoding failed: {exc}")
            return
        self._stage_finished(job_id, "decode")
        self._finish(job_id, "succeeded", result_path=result["path"], sidecar_path=result["sidecar"])
