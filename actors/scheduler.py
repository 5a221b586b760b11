"""Stage scheduler policy: which job runs next in encode -> denoise -> decode (Difflow-style).

Pure bookkeeping of job ids per stage, like vLLM's scheduler that deals in ids and counts
(tests/test_layering.py pins it): no I/O, no asyncio, no threads, no torch or ray. The async engine owns one
instance, calls it from one event loop, and does the actor calls and the job-store writes.

Each job is in exactly one place: queued in a stage or running in a stage. The engine moves it:

    submit -> take_encode -> encoded -> take_denoise -> chunk_done(finished=False) -> take_denoise ...
           -> chunk_done(finished=True) -> take_decode -> decoded

Ordering is strict priority (higher first), then FIFO by submission sequence. The denoise stage
is dispatched in chunks of steps and a job goes back into the denoise queue between chunks with
its original sequence number, so it keeps its place among jobs of its priority while a
higher-priority newcomer overtakes it at the next chunk boundary. Strict priority can starve
low-priority jobs under a sustained stream of higher-priority work; this is deliberate (priority
is an operator tool, and the admission bound keeps the backlog finite), so use few priority levels.

Cancellation: a queued job leaves at once; a running job is only flagged, because its actor is
busy with it (and, between denoise chunks, a DiT group holds its state). The engine checks
`is_cancelled` whenever a job returns from a stage or is taken from a queue, and then stops it
and calls `finish`. A flagged job may still be moved on (`encoded`, `chunk_done`, `retry`): it
keeps its flag and goes to the front of the next queue, so the next `take_*` hands it back for
clean-up at once instead of leaving it to wait behind other work. Nothing is dropped silently.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

logger = logging.getLogger(__name__)

Stage = Literal["encode", "denoise", "decode"]
STAGES: tuple[Stage, ...] = ("encode", "denoise", "decode")

# Queue sort key, smallest first: (0 for a cancelled job / 1 otherwise, -priority,
# 0 for a retried job / 1 otherwise, submission sequence).
_Key = tuple[int, int, int, int]


class QueueFull(Exception):
    """Admission refused: the system already holds `limit` jobs; the caller answers 429/503 + Retry-After."""

    def __init__(self, pending: int, limit: int) -> None:
        super().__init__(f"too many pending jobs ({pending}, limit {limit}); retry later")
        self.pending = pending
        self.limit = limit


@dataclass
class _Job:
    seq: int  # submission order; FIFO tie-break within a priority, kept across chunks
    priority: int
    stage: Stage
    running: bool = False
    key: _Key | None = None  # position in the stage queue while queued
    cancelled: bool = False


class StageScheduler:
    """Per-stage queues and running sets of job ids, with admission control at `max_pending`."""

    def __init__(self, max_pending: int) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending ({max_pending}) must be >= 1")
        self.max_pending = max_pending
        self._jobs: dict[str, _Job] = {}
        self._queues: dict[Stage, list[tuple[_Key, str]]] = {s: [] for s in STAGES}  # sorted, best first
        self._running: dict[Stage, dict[str, None]] = {s: {} for s in STAGES}  # insertion-ordered sets
        self._next_seq = 0

    # -- admission and moves between stages ---------------------------------------------------------

    def submit(self, job_id: str, priority: int = 0) -> None:
        """Queue a new job for encoding, or raise QueueFull when `max_pending` jobs are in the system."""
        if job_id in self._jobs:
            raise ValueError(f"job {job_id} is already scheduled (in {self._jobs[job_id].stage}); "
                             "submit each job id once")
        if self.pending >= self.max_pending:
            raise QueueFull(self.pending, self.max_pending)
        job = _Job(seq=self._next_seq, priority=int(priority), stage="encode")
        self._next_seq += 1
        self._jobs[job_id] = job
        self._enqueue(job_id, job, "encode")
        logger.debug("job %s submitted (priority %d, %d pending)", job_id, job.priority, self.pending)

    def take_encode(self, max_batch: int) -> list[str]:
        """Up to `max_batch` best queued jobs, now running in "encode" (one text-encoder batch)."""
        if max_batch < 1:
            raise ValueError(f"max_batch ({max_batch}) must be >= 1")
        taken: list[str] = []
        while len(taken) < max_batch:
            job_id = self._pop("encode")
            if job_id is None:
                break
            taken.append(job_id)
        return taken

    def encoded(self, job_id: str) -> None:
        """Encoding returned: the job waits for a DiT group."""
        job = self._expect_running(job_id, "encode")
        self._move(job_id, job, "denoise")

    def take_denoise(self, eligible: Callable[[str], bool] | None = None) -> str | None:
        """The best job waiting for a denoise chunk, now running in "denoise"; None if none waits.

        `eligible(job_id)` restricts the choice, e.g. to jobs whose denoising state lives on the
        DiT group asking (or that have none yet); the best eligible job in queue order is taken.
        """
        return self._pop("denoise", eligible)

    def chunk_done(self, job_id: str, finished: bool) -> None:
        """A denoise chunk returned: back into the denoise queue (same place), or on to decode if finished."""
        job = self._expect_running(job_id, "denoise")
        self._move(job_id, job, "decode" if finished else "denoise")

    def take_decode(self) -> str | None:
        """The best job waiting for the VAE, now running in "decode"; None if none waits."""
        return self._pop("decode")

    def decoded(self, job_id: str) -> None:
        """Decoding returned: the job leaves the system."""
        self._expect_running(job_id, "decode")
        self.finish(job_id)

    def finish(self, job_id: str) -> bool:
        """Remove the job wherever it is (success, failure, or a cancelled job that stopped).

        Idempotent, so failure paths may call it freely; returns False if the job was not here.
        """
        job = self._jobs.pop(job_id, None)
        if job is None:
            return False
        self._detach(job_id, job)
        logger.debug("job %s left the scheduler (%d pending)", job_id, self.pending)
        return True

    def retry(self, job_id: str, stage: str) -> None:
        """Put a running job whose actor died at the head of its priority class in `stage`'s queue.

        Retried jobs go before all non-retried jobs of the same priority and keep submission order
        among themselves. The retry only sets this one placement: later chunks queue normally.
        A job flagged as cancelled keeps its flag (and goes to the very front, to be cleaned up).
        """
        target = _check_stage(stage)
        job = self._jobs.get(job_id)
        if job is None or not job.running:
            where = "not scheduled" if job is None else f"queued in {job.stage}"
            raise ValueError(f"job {job_id} is {where}; only a running job can be retried")
        self._detach(job_id, job)
        self._enqueue(job_id, job, target, retried=True)
        logger.info("job %s re-queued at the head of %s (priority %d)", job_id, target, job.priority)

    def cancel(self, job_id: str) -> Literal["removed", "running", "unknown"]:
        """Cancel a job: queued ones leave now ("removed"); running ones are flagged ("running").

        "running" means the engine must stop the job and call `finish`; it is also the answer for
        an already-flagged job that has since moved on to a queue (it is still being stopped).
        """
        job = self._jobs.get(job_id)
        if job is None:
            return "unknown"
        if job.running or job.cancelled:
            job.cancelled = True
            logger.debug("job %s flagged for cancellation while running in %s", job_id, job.stage)
            return "running"
        self.finish(job_id)
        return "removed"

    # -- queries ------------------------------------------------------------------------------------

    def is_cancelled(self, job_id: str) -> bool:
        """True if the job was cancelled while running: stop it at the next boundary and call `finish`."""
        job = self._jobs.get(job_id)
        return job is not None and job.cancelled

    def stage_of(self, job_id: str) -> tuple[str, bool] | None:
        """(stage, running?) of a job in the system, else None."""
        job = self._jobs.get(job_id)
        return None if job is None else (job.stage, job.running)

    def depth(self, stage: str) -> int:
        """Jobs queued (not running) in `stage`."""
        return len(self._queues[_check_stage(stage)])

    def queued(self, stage: str) -> list[str]:
        """Queued job ids of `stage`, in the order they will be taken."""
        return [job_id for _, job_id in self._queues[_check_stage(stage)]]

    def running(self, stage: str) -> list[str]:
        """Job ids running in `stage`, in the order they started."""
        return list(self._running[_check_stage(stage)])

    @property
    def pending(self) -> int:
        """Jobs in the system (queued or running in any stage): what admission control counts."""
        return len(self._jobs)

    def snapshot(self) -> dict[str, object]:
        """Counts for metrics and readiness: per-stage queued / running, totals and the limit."""
        return {
            "pending": self.pending,
            "max_pending": self.max_pending,
            "cancelling": sum(job.cancelled for job in self._jobs.values()),
            "stages": {s: {"queued": len(self._queues[s]), "running": len(self._running[s])} for s in STAGES},
        }

    # -- internals ----------------------------------------------------------------------------------

    def _enqueue(self, job_id: str, job: _Job, stage: Stage, retried: bool = False) -> None:
        job.stage, job.running = stage, False
        job.key = (0 if job.cancelled else 1, -job.priority, 0 if retried else 1, job.seq)
        bisect.insort(self._queues[stage], (job.key, job_id))

    def _pop(self, stage: Stage, eligible: Callable[[str], bool] | None = None) -> str | None:
        queue = self._queues[stage]
        index = next((i for i, (_, j) in enumerate(queue) if eligible is None or eligible(j)), None)
        if index is None:
            return None
        _, job_id = queue.pop(index)
        job = self._jobs[job_id]
        job.running, job.key = True, None
        self._running[stage][job_id] = None
        return job_id

    def _detach(self, job_id: str, job: _Job) -> None:
        """Take the job out of its queue or running set (not out of `_jobs`)."""
        if job.running:
            del self._running[job.stage][job_id]
        else:
            assert job.key is not None, f"queued job {job_id} has no queue position"
            queue = self._queues[job.stage]
            index = bisect.bisect_left(queue, (job.key, job_id))
            del queue[index]
            job.key = None

    def _move(self, job_id: str, job: _Job, stage: Stage) -> None:
        self._detach(job_id, job)
        self._enqueue(job_id, job, stage)

    def _expect_running(self, job_id: str, stage: Stage) -> _Job:
        job = self._jobs.get(job_id)
        if job is None or not job.running or job.stage != stage:
            where = "not scheduled" if job is None else f"{'running' if job.running else 'queued'} in {job.stage}"
            raise ValueError(f"job {job_id} is {where}, not running in {stage}; "
                             "report a stage result only for a job taken from that stage")
        return job


def _check_stage(stage: str) -> Stage:
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is unknown; use one of {', '.join(STAGES)}")
    return stage  # type: ignore[return-value]
