"""The stage engine: moves jobs through the text-encoder pool, the DiT groups and the VAE pool.

One asyncio loop owns everything: the `StageScheduler` policy (which job next, per stage), the
durable `JobStore`, and one worker coroutine per stage actor (per DiT group), so text encoding,
denoising and decoding of different jobs run at the same time on different pools. Denoising
is dispatched once per job by default (`dit.chunk_steps` caps a dispatch): rank 0 streams an event
per step on that call, which the engine publishes (status, SSE) from memory; the job store gets the
step when the dispatch returns. Cancellation and a waiting job of higher priority stop a running
dispatch out of band at the next step boundary, on every rank at the same step (`DiTGroup.stop`);
the stopped job goes back to the denoise queue with its state on the group, as between chunks.

Faults: a stage call that raises StageActorDied (an actor or rank died, a rank's error stranded
its group, a call hung) is retried up to scheduler.max_attempts while the pool or group is
rebuilt. One health loop per stage pings every actor and rank every `health_check_period_s`,
so a dead idle actor is replaced without waiting for a job, and `snapshot()` (served as /readyz)
reports each stage as "ok" or names what is rebuilding. Job-store writes (fsynced) run in a
thread, one at a time in the order issued, so a slow disk never stalls the loop; the engine
serves the records of the jobs it is running from memory (`status`).

Used by the Serve ingress (serve_app.py) and by the batch runner (actors/batch.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Protocol

import ray

from actors.config import ServiceConfig
from actors.dit_group import DiTGroup
from actors.errors import StageActorDied, error_headline
from actors.job_store import TERMINAL_STATUSES, JobRecord, JobStore
from actors.pool import GroupPool, StagePool
from actors.resources import ClusterResources, check_fits, fit_to_cluster, placement_plan
from actors.scheduler import QueueFull, StageScheduler
from actors.stage_actors import TextEncoderActor, VAEDecoderActor
from actors.vae_group import VAEGroup
from models.registry import describe, resolve_model_path
from stages.media import output_suffix
from stages.params import GenerationParams, ResolvedParams

logger = logging.getLogger(__name__)

__all__ = ["EngineMetrics", "JobNotFound", "QueueFull", "StageEngine"]

RECENT_RECORDS = 1000
"""Finished jobs whose last record `status()` keeps serving from memory (older ones come from the store)."""


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
    """A job's prompt conditioning, as references into the object store (`ConditioningArrays` there); the
    negative one refers to None when the job is not guided."""

    positive: ray.ObjectRef
    negative: ray.ObjectRef


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
        # the served model, as every layer above models/ sees it (its cache calibration resolves requests here)
        self.model = describe(self.model_path, cfg.cache_calibration)
        self.store = store or JobStore(cfg.job_store)
        self.metrics: EngineMetrics = metrics or NullMetrics()
        self.scheduler = StageScheduler(cfg.scheduler.max_pending_jobs)
        self.output_dir = Path(cfg.output_dir)
        self.ready = False

        model = str(self.model_path)
        te, vae = cfg.text_encoder, cfg.vae
        self.text_pool = StagePool("text_encode", TextEncoderActor,
                                   (model, cfg.dtype, cfg.actor_device(te.num_gpus)), {}, te, "text_encoder")
        # vae.patch_parallel > 1: each decode replica is a group of ranks that decode strips (same interface).
        self.vae_pool: StagePool | GroupPool = (
            GroupPool("decode", [VAEGroup(cfg, i, model=model) for i in range(vae.replicas)])
            if vae.patch_parallel > 1 else
            StagePool("decode", VAEDecoderActor, (model, cfg.actor_device(vae.num_gpus)), {}, vae, "vae"))
        logger.info("decode pool: %d replicas, %s", vae.replicas,
                    f"each a patch-parallel group of {vae.patch_parallel} VAE ranks" if vae.patch_parallel > 1
                    else "each one VAE actor")
        self.dit_groups = [DiTGroup(cfg, i, model=model) for i in range(cfg.dit.groups)]

        self._embeddings: dict[str, _Embeddings] = {}
        self._latents: dict[str, ray.ObjectRef] = {}  # final latents (C, F', H', W') in the object store
        self._owner: dict[str, int] = {}  # job id -> DiT group holding its denoising state
        self._subscribers: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}
        self._changed: asyncio.Condition | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._stopping = False
        self._dit_busy: set[int] = set()  # DiT groups running a call for a job right now
        self._dispatched: dict[str, int] = {}  # job id -> the DiT group running a run_steps dispatch of it now
        self._stops: dict[str, asyncio.Task[None]] = {}  # job id -> its dispatch's stop request under way
        self._dit_rebuilds: dict[int, asyncio.Task[None]] = {}  # the one rebuild under way per DiT group
        self._store_lock: asyncio.Lock | None = None  # one store write at a time, in the order issued
        self._accepting = 0  # submits whose record is being written (they hold a queue place already)
        self._records: dict[str, JobRecord] = {}  # latest record of each job written here (unfinished + recent)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start every pool and group (concurrently), recover unfinished jobs, start the workers."""
        self._changed = asyncio.Condition()
        self._store_lock = asyncio.Lock()
        await self.store.take_ownership(self.cfg.job_store_lock_timeout_s)  # one engine per store at a time
        started = time.perf_counter()
        await asyncio.gather(self.text_pool.start(), self.vae_pool.start(), *(g.start() for g in self.dit_groups))
        logger.info("stage pools ready in %.1f s (text %d, DiT %d x %d ranks, VAE %d x %d ranks)",
                    time.perf_counter() - started, self.text_pool.size, len(self.dit_groups),
                    self.cfg.dit.world_size, self.vae_pool.size, self.cfg.vae.patch_parallel)
        await self._recover()
        workers = [self._encode_worker() for _ in range(self.text_pool.size)]
        workers += [self._denoise_worker(i) for i in range(len(self.dit_groups))]
        workers += [self._decode_worker() for _ in range(self.vae_pool.size)]
        cfg = self.cfg
        workers += [self._health_loop("text_encode", self.text_pool.check_health,
                                      cfg.text_encoder.health_check_period_s),
                    self._health_loop("denoise", self._check_dit_groups, cfg.dit.health_check_period_s),
                    self._health_loop("decode", self.vae_pool.check_health, cfg.vae.health_check_period_s)]
        self._workers = [asyncio.create_task(w) for w in workers]
        self.ready = True
        await self._notify()

    async def shutdown(self) -> None:
        self.ready = False
        self._stopping = True
        for task in self._workers:
            task.cancel()
        for task in [*self._dit_rebuilds.values(), *self._stops.values()]:
            task.cancel()
        if self._workers or self._dit_rebuilds:
            await asyncio.wait([*self._workers, *self._dit_rebuilds.values()], timeout=10)
        await asyncio.gather(self.text_pool.shutdown(), self.vae_pool.shutdown(),
                             *(g.shutdown() for g in self.dit_groups), return_exceptions=True)
        self.store.release_ownership()

    async def _recover(self) -> None:
        """Jobs a previous run accepted but did not finish: re-queue them, or fail them with the reason."""
        for record in await asyncio.to_thread(self.store.unfinished):
            if not self.cfg.resume_unfinished:
                await self._fail(record.id, "the service restarted before this job finished (resume_unfinished "
                                            "is off)")
                continue
            try:
                self.scheduler.submit(record.id, record.priority)
            except QueueFull:
                await self._fail(record.id, "the service restarted and its queue was full; submit the job again")
                continue
            await self._store(self.store.update, record.id, status="queued", step=0)
            logger.info("resumed unfinished job %s (was %s)", record.id, record.status)

    # ------------------------------------------------------------------ public API
    def resolve(self, params: GenerationParams | Mapping[str, Any]) -> ResolvedParams:
        """Validate (pydantic.ValidationError names the field) and fill the model's defaults."""
        if not isinstance(params, GenerationParams):
            params = GenerationParams.model_validate(params)
        return params.resolve(self.model)

    async def submit(self, params: GenerationParams | Mapping[str, Any], *, priority: int = 0, kind: str | None = None,
                     key: str | None = None) -> JobRecord:
        """Accept a job (recorded durably before this returns) or raise QueueFull / ValidationError.

        kind: "video" or "image" (the id's prefix); None = what the model makes.
        """
        kind = kind or self.model.output
        resolved = self.resolve(params)
        pending = self.scheduler.pending + self._accepting  # count the submits still writing their record
        if pending >= self.cfg.scheduler.max_pending_jobs:
            raise QueueFull(pending, self.cfg.scheduler.max_pending_jobs)
        # durable before we answer "accepted"; the write runs in a thread, so the loop serves others meanwhile
        self._accepting += 1
        try:
            record = await self._store(self.store.create, resolved.model_dump(), kind=kind, priority=priority,
                                       key=key)
        finally:
            self._accepting -= 1
        self.scheduler.submit(record.id, priority)
        self._publish(record)
        await self._notify()
        return record

    async def generate(self, params: GenerationParams | Mapping[str, Any], *, priority: int = 0,
                       kind: str | None = None, timeout_s: float | None = None) -> JobRecord:
        """Submit and wait for the final record."""
        record = await self.submit(params, priority=priority, kind=kind)
        return await self.wait(record.id, timeout_s)

    def status(self, job_id: str) -> JobRecord:
        """The job's latest record: from memory for the jobs this engine runs, else from the store."""
        record = self._records.get(job_id) or self.store.get(job_id)
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
        """Cancel a queued job at once; a running one stops at its next step boundary (denoising) or when its
        stage call returns (encoding, decoding)."""
        record = self.status(job_id)
        if record.done:
            return record
        outcome = self.scheduler.cancel(job_id)
        if outcome == "running":
            self._stop_dispatch(job_id, "cancelled")
        if outcome in ("removed", "unknown"):
            owner = self._owner.get(job_id)
            if owner is not None:  # cancelled between chunks: free its state in the DiT group
                await self.dit_groups[owner].drop(job_id)
            await self._finish(job_id, "cancelled")
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
        self._records.pop(job_id, None)

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
        """Readiness (/readyz): ready only while the engine runs and every stage is "ok"; "stages" names the
        actors or groups that are not (e.g. {"denoise": {"group 0": "rebuilding"}}), as of the last health check."""
        stages = {"text_encode": self.text_pool.health(), "denoise": self._dit_health(),
                  "decode": self.vae_pool.health()}
        return {"ready": self.ready and all(state == "ok" for state in stages.values()), "stages": stages,
                "queues": self.scheduler.snapshot(), "model": str(self.model_path), "preset": self.model.name}

    # ------------------------------------------------------------------ bookkeeping
    @staticmethod
    def _event(record: JobRecord) -> dict[str, Any]:
        return {"id": record.id, "status": record.status, "progress": round(record.progress, 4),
                "step": record.step, "total_steps": record.total_steps, "attempts": record.attempts,
                "error": record.error}

    def _publish(self, record: JobRecord) -> None:
        event = self._event(record)
        for queue in self._subscribers.get(record.id, ()):
            queue.put_nowait(event)

    async def _store(self, write: Callable[..., JobRecord], *args: Any, **kwargs: Any) -> JobRecord:
        """Run one job-store write (create / update / mark_stage) in a thread and keep its record in memory.

        The store fsyncs every commit, so on the loop a slow disk would stall every job; the lock
        (FIFO) runs the writes one at a time in the order they were issued, so a job's updates
        land in order.
        """
        assert self._store_lock is not None, "start() the engine first"
        async with self._store_lock:
            record = await asyncio.to_thread(write, *args, **kwargs)
        self._records.pop(record.id, None)  # re-insert: the dict stays ordered by last write
        self._records[record.id] = record
        finished = [j for j, r in self._records.items() if r.done]
        for old in finished[:max(0, len(finished) - RECENT_RECORDS)]:
            del self._records[old]
        return record

    async def _update(self, job_id: str, **fields: Any) -> JobRecord:
        record = await self._store(self.store.update, job_id, **fields)
        self._publish(record)
        return record

    async def _stage_started(self, job_id: str, stage: str, status: str) -> None:
        await self._store(self.store.mark_stage, job_id, stage, start=True)
        await self._update(job_id, status=status)

    async def _stage_finished(self, job_id: str, stage: str) -> None:
        record = await self._store(self.store.mark_stage, job_id, stage, start=False)  # records timings too
        self.metrics.stage_latency(stage, record.timings[stage])

    async def _finish(self, job_id: str, status: str, **fields: Any) -> None:
        self.scheduler.finish(job_id)
        self._embeddings.pop(job_id, None)
        self._latents.pop(job_id, None)
        self._owner.pop(job_id, None)
        await self._update(job_id, status=status, **fields)
        self.metrics.job_finished(status)

    async def _fail(self, job_id: str, error: str, exc: BaseException | None = None) -> None:
        """error: what the job record (and so the user) shows; exc: logged with its traceback."""
        logger.warning("job %s failed: %s", job_id, error, exc_info=exc)
        await self._finish(job_id, "failed", error=error)

    async def _retry_or_fail(self, job_id: str, stage: str, exc: StageActorDied) -> None:
        attempts = self.status(job_id).attempts + 1
        if attempts >= self.cfg.scheduler.max_attempts:
            await self._fail(job_id, f"{exc} (gave up after {attempts} attempts)")
            return
        logger.warning("job %s: %s; retrying %s (attempt %d)", job_id, exc, stage, attempts + 1)
        # A denoising retry starts again at step 0, with a fresh feature cache: say so now (progress drops once,
        # with attempts + 1, and the lost attempt's cache counts go) rather than show the lost steps until the
        # rebuilt group restarts the job.
        restart = {"step": 0, "cache": None} if stage == "denoise" else {}
        await self._update(job_id, attempts=attempts, **restart)
        self.scheduler.retry(job_id, stage)

    async def _notify(self) -> None:
        assert self._changed is not None, "start() the engine first"
        self._preempt_for_priority()
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
            await self._stage_started(job_id, "text_encode", "encoding")
        requests = [(p.prompt, p.negative_prompt if p.guided else None) for p in params.values()]
        try:
            # the arrays stay in the object store: the engine keeps references and hands them to the DiT group
            _, *parts = await self.text_pool.call("encode_apart", requests, num_returns=1 + 2 * len(requests))
        except StageActorDied as exc:
            for job_id in batch:
                await self._retry_or_fail(job_id, "encode", exc)
            return
        except Exception as exc:  # noqa: BLE001 - the job fails with the reason, the service goes on
            for job_id in batch:
                await self._fail(job_id, f"text encoding failed: {error_headline(exc)}", exc)
            return
        for job_id, positive, negative in zip(batch, parts[0::2], parts[1::2]):
            await self._stage_finished(job_id, "text_encode")
            if self.scheduler.is_cancelled(job_id):
                await self._finish(job_id, "cancelled")
                continue
            self._embeddings[job_id] = _Embeddings(positive, negative)
            self.scheduler.encoded(job_id)

    async def _denoise_worker(self, group_index: int) -> None:
        group = self.dit_groups[group_index]
        while not self._stopping:
            rebuild = self._dit_rebuilds.get(group_index)
            if rebuild is not None:
                await asyncio.wait([rebuild])  # not `await rebuild`: cancelling this worker must not cancel it
                continue
            job_id = self.scheduler.take_denoise(
                lambda j: self._owner.get(j, group_index) == group_index) if group.running else None
            if job_id is None:  # no work, or the group is down until the health check rebuilds it
                await self._wait_for_work()
                continue
            self._dit_busy.add(group_index)
            try:
                await self._denoise_chunk(group_index, group, job_id)
            finally:
                self._dit_busy.discard(group_index)
            await self._notify()

    async def _denoise_chunk(self, group_index: int, group: DiTGroup, job_id: str) -> None:
        try:
            if self.scheduler.is_cancelled(job_id):
                if job_id in self._owner:
                    await group.drop(job_id)
                await self._finish(job_id, "cancelled")
                return
            if job_id not in self._owner:
                embeddings = self._embeddings[job_id]
                total = await group.begin(job_id, self._params(job_id).model_dump(), embeddings.positive,
                                          embeddings.negative)
                self._owner[job_id] = group_index
                await self._stage_started(job_id, "denoise", "denoising")
                await self._update(job_id, step=0, total_steps=total)
            record = self.status(job_id)
            steps = self.cfg.dit.chunk_steps or max(1, record.total_steps - record.step)
            on_step = (lambda event: self._step_done(job_id, event)) if self.cfg.dit.step_events else None
            self._dispatched[job_id] = group_index
            try:
                out = await group.run_steps(job_id, steps, on_step=on_step)
            finally:
                self._dispatched.pop(job_id, None)
            self.metrics.denoise_steps(len(out["step_times"]))
            cache = {"cache": out["cache"]} if out.get("cache") is not None else {}
            await self._update(job_id, step=out["step"], total_steps=out["total"], **cache)
            if not out["done"]:
                self.scheduler.chunk_done(job_id, finished=False)
                return
            self._latents[job_id] = await group.result_ref(job_id)
            self._owner.pop(job_id, None)
            await self._stage_finished(job_id, "denoise")
            self.scheduler.chunk_done(job_id, finished=True)
        except StageActorDied as exc:
            self._owner.pop(job_id, None)
            await self._retry_or_fail(job_id, "denoise", exc)
            self._rebuild_dit(group_index)  # the worker waits for it before taking the next job
        except Exception as exc:  # noqa: BLE001
            self._owner.pop(job_id, None)
            await self._fail(job_id, f"denoising failed: {error_headline(exc)}", exc)
            await group.drop(job_id)

    def _step_done(self, job_id: str, event: Mapping[str, Any]) -> None:
        """A step finished inside a running dispatch (streamed by rank 0): new progress for status() and the
        event stream, kept in memory; the job store gets the step when the dispatch returns."""
        record = self._records.get(job_id)
        if record is None or record.done:
            return
        cache = {"cache": event["cache"]} if event.get("cache") is not None else {}
        record = dataclasses.replace(record, step=int(event["step"]), total_steps=int(event["total"]),
                                     updated_at=time.time(), **cache)
        self._records[job_id] = record
        self._publish(record)

    def _stop_dispatch(self, job_id: str, why: str) -> None:
        """Ask the DiT group running a dispatch of the job to stop it at the next step boundary (in the background:
        the dispatch then returns unfinished and the worker goes on as between chunks)."""
        group_index = self._dispatched.get(job_id)
        if group_index is None or job_id in self._stops:
            return
        logger.info("job %s: stopping its denoising dispatch on DiT group %d (%s)", job_id, group_index, why)

        async def stop() -> None:
            try:
                await self.dit_groups[group_index].stop(job_id)
            except Exception:  # noqa: BLE001 - a broken group fails the dispatch itself, which handles it
                logger.exception("stopping job %s on DiT group %d failed", job_id, group_index)
            finally:
                self._stops.pop(job_id, None)

        self._stops[job_id] = asyncio.create_task(stop())

    def _preempt_for_priority(self) -> None:
        """When the best job waiting to denoise outranks a running dispatch on a group it could use, and no such
        group is free, stop the lowest-priority of those dispatches: the waiting job gets the group at the next
        step boundary (strict priority, as between chunks), the stopped one waits with its state on the group."""
        waiting = next((j for j in self.scheduler.queued("denoise") if not self.scheduler.is_cancelled(j)), None)
        if waiting is None:
            return
        priority = self.status(waiting).priority
        usable = [i for i, g in enumerate(self.dit_groups)
                  if g.running and i not in self._dit_rebuilds and self._owner.get(waiting, i) == i]
        if any(i not in self._dit_busy for i in usable):
            return  # a free group takes it without stopping anyone
        running = [(self.status(j).priority, j) for j, i in self._dispatched.items()
                   if i in usable and j not in self._stops]
        if running:
            lowest, job_id = min(running)
            if lowest < priority:
                self._stop_dispatch(job_id, f"job {waiting} of priority {priority} is waiting")

    def _rebuild_dit(self, group_index: int) -> asyncio.Task[None]:
        """Start rebuilding DiT group `group_index`, unless a rebuild is already under way; returns it.

        Every job whose denoising state lived in the group is lost with it: those waiting between
        chunks start their denoising afresh on whichever group takes them next.
        """
        task = self._dit_rebuilds.get(group_index)
        if task is not None:
            return task
        for job_id, owner in list(self._owner.items()):
            if owner == group_index:
                self._owner.pop(job_id)
        task = asyncio.create_task(self._restart_group(group_index))
        self._dit_rebuilds[group_index] = task
        task.add_done_callback(lambda _: self._dit_rebuilds.pop(group_index, None))
        return task

    async def _restart_group(self, group_index: int) -> None:
        try:
            await self.dit_groups[group_index].restart()
            logger.info("DiT group %d rebuilt", group_index)
        except Exception:  # noqa: BLE001 - keep serving on the other groups; the health check tries again
            logger.exception("rebuilding DiT group %d failed; the health check will try again", group_index)
        await self._notify()

    # ------------------------------------------------------------------ health
    async def _health_loop(self, stage: str, check: Callable[[], Awaitable[None]], period_s: float) -> None:
        """Run one stage's health check every period_s until shutdown; a failing check is logged, not fatal."""
        while not self._stopping:
            await asyncio.sleep(period_s)
            try:
                await check()
            except Exception:  # noqa: BLE001 - the next round tries again
                logger.exception("%s health check failed", stage)

    async def _check_dit_groups(self) -> None:
        """Ping every rank of every DiT group; rebuild a group that is broken or down unless a job's call is
        running on it (that call fails on the killed ranks and the worker rebuilds the group)."""
        async def check(index: int, group: DiTGroup) -> None:
            if index in self._dit_rebuilds or (group.running and await group.ping()):
                return
            if index not in self._dit_busy and index not in self._dit_rebuilds:
                logger.warning("health check: DiT group %d is %s; rebuilding it", index,
                               f"broken ({group.broken_reason})" if group.broken else "down")
                self._rebuild_dit(index)

        await asyncio.gather(*(check(i, g) for i, g in enumerate(self.dit_groups)))

    def _dit_health(self) -> str | dict[str, str]:
        """"ok", or {"group <i>": "rebuilding" | "broken" | "down"} for the DiT groups that cannot serve."""
        trouble = {}
        for index, group in enumerate(self.dit_groups):
            if index in self._dit_rebuilds:
                trouble[f"group {index}"] = "rebuilding"
            elif group.broken:
                trouble[f"group {index}"] = "broken"
            elif not group.running:
                trouble[f"group {index}"] = "down"
        return trouble or "ok"

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
        await self._stage_started(job_id, "decode", "decoding")
        path = self.output_dir.resolve() / f"{job_id}{output_suffix(params.num_frames)}"
        sidecar = {"id": job_id, "model": str(self.model_path), "preset": self.model.name,
                   "params": params.model_dump(), "created_at": record.created_at,
                   "timings_s": self.status(job_id).timings, "cache": record.cache}
        try:
            result = await self.vae_pool.call("decode", self._latents[job_id], str(path), params.fps, sidecar)
        except StageActorDied as exc:
            await self._retry_or_fail(job_id, "decode", exc)
            return
        except Exception as exc:  # noqa: BLE001
            await self._fail(job_id, f"decoding failed: {error_headline(exc)}", exc)
            return
        await self._stage_finished(job_id, "decode")
        await self._finish(job_id, "succeeded", result_path=result["path"], sidecar_path=result["sidecar"])
