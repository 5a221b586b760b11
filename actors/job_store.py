"""Durable record of every accepted job (SQLite), so no accepted job is lost across restarts.

The service writes a row before it answers "accepted" and updates it at every stage boundary;
on start-up `unfinished()` says what a previous run left behind. One connection guarded by a
lock serves all threads and asyncio tasks of one process: every call is a short transaction.
WAL mode lets readers (status polls) proceed while a writer commits; `synchronous=FULL`
makes a committed row survive a power cut, which is cheap at one write per chunk.

Only one engine may run a store's jobs at a time (two would run every unfinished job twice):
`StoreLease` is that ownership, an OS file lock next to the database that an engine takes before
it recovers jobs and that the OS drops when the owner's process ends, however it ends.

Stdlib only: the store must import neither torch nor ray (tests/test_layering.py pins it).
"""

from __future__ import annotations

import asyncio
import builtins
import fcntl
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal, get_args

logger = logging.getLogger(__name__)

JobStatus = Literal["queued", "encoding", "denoising", "decoding", "succeeded", "failed", "cancelled"]
JobKind = Literal["video", "image"]
STATUSES: frozenset[str] = frozenset(get_args(JobStatus))
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
_ID_PREFIX: dict[str, str] = {"video": "video", "image": "img"}

# Fields `JobStore.update` may change; the rest (id, kind, params, key, created_at) are fixed at
# acceptance, and updated_at / finished_at / progress_at_stop are maintained by the store.
UPDATABLE_FIELDS: frozenset[str] = frozenset(
    {"status", "step", "total_steps", "priority", "attempts", "error", "result_path", "sidecar_path",
     "timings", "stage_times", "cache"})


def progress_of(status: str, step: int, total_steps: int) -> float:
    """Progress in [0, 1] of a live (or succeeded) job.

    queued 0.0, encoding 0.02, denoising 0.05 + 0.85 * step / total_steps (0.05 while
    total_steps is unknown, i.e. 0), decoding 0.92, succeeded 1.0. Denoising dominates the
    wall time, hence its 85 % share. failed / cancelled have no value of their own: the record
    keeps the progress the job had when it stopped (`JobRecord.progress_at_stop`).
    """
    if status == "queued":
        return 0.0
    if status == "encoding":
        return 0.02
    if status == "denoising":
        frac = min(max(step / total_steps, 0.0), 1.0) if total_steps > 0 else 0.0
        return 0.05 + 0.85 * frac
    if status == "decoding":
        return 0.92
    if status == "succeeded":
        return 1.0
    raise ValueError(f"status {status!r} has no progress of its own; use one of queued, encoding, "
                     "denoising, decoding, succeeded")


@dataclass(frozen=True)
class JobRecord:
    """One accepted job as stored. Immutable: `JobStore.update` returns a fresh record."""

    id: str
    kind: JobKind
    params: dict[str, Any]  # the request's JSON-able params, as given at acceptance
    priority: int
    status: JobStatus
    step: int  # denoising steps done
    total_steps: int  # denoising steps planned; 0 while unknown
    created_at: float  # epoch seconds
    updated_at: float
    finished_at: float | None  # set when the status becomes terminal
    attempts: int  # tries started so far (the engine increments it per try)
    error: str | None
    result_path: str | None
    sidecar_path: str | None
    timings: dict[str, float]  # seconds per stage
    stage_times: dict[str, list[float]]  # stage -> [start_epoch] while running, [start, end] when done
    key: str | None  # optional caller key (e.g. the batch runner's per-prompt id), unique when set
    progress_at_stop: float | None = None  # progress when the job failed or was cancelled
    cache: dict[str, int] | None = None  # the feature cache's counts (flexcache CacheStats), None without one

    @property
    def done(self) -> bool:
        """True once the job can no longer change status (succeeded, failed or cancelled)."""
        return self.status in TERMINAL_STATUSES

    @property
    def progress(self) -> float:
        """Fraction done in [0, 1]; formula in `progress_of`, frozen at the stop for failed/cancelled."""
        if self.status in ("failed", "cancelled"):
            return self.progress_at_stop if self.progress_at_stop is not None else 0.0
        return progress_of(self.status, self.step, self.total_steps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view for HTTP responses and sidecars; includes `progress` and `done`."""
        data = asdict(self)
        data.pop("progress_at_stop")
        data["progress"] = self.progress
        data["done"] = self.done
        return data


class DuplicateJobError(ValueError):
    """A job with this key (or id) already exists; the caller should fetch it instead of re-creating it."""

    def __init__(self, message: str, existing_id: str) -> None:
        super().__init__(message)
        self.existing_id = existing_id


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- acceptance order: list/unfinished order and cursors
    id TEXT NOT NULL UNIQUE,
    key TEXT UNIQUE,
    kind TEXT NOT NULL,
    params TEXT NOT NULL,
    priority INTEGER NOT NULL,
    status TEXT NOT NULL,
    step INTEGER NOT NULL,
    total_steps INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    attempts INTEGER NOT NULL,
    error TEXT,
    result_path TEXT,
    sidecar_path TEXT,
    timings TEXT NOT NULL,
    stage_times TEXT NOT NULL,
    progress_at_stop REAL,
    cache TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""
_COLUMNS = ("id", "kind", "params", "priority", "status", "step", "total_steps", "created_at", "updated_at",
            "finished_at", "attempts", "error", "result_path", "sidecar_path", "timings", "stage_times", "key",
            "progress_at_stop", "cache")
_JSON_COLUMNS = ("params", "timings", "stage_times", "cache")
# Columns added after the first release, with their SQL type: a store written before them gains them (NULL).
_ADDED_COLUMNS = {"cache": "TEXT"}
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM jobs"

class StoreLeaseTimeout(TimeoutError):
    """Another process still owned the job store when the wait for it ran out."""


class StoreLease:
    """Exclusive ownership of one job store by one process at a time: the engine that runs its jobs.

    An advisory `flock` on `<store>.lock`, not a row in the database, because the OS drops it the
    moment its owner closes the file or ends, SIGKILL included: a crashed owner never blocks its
    successor and nothing has to expire. The owner writes its pid, host and start time into the
    file, so a waiting process can say whom it waits for. flock locks belong to the open file,
    so two leases in one process exclude each other as well; the descriptor is close-on-exec, so
    a program the owner starts does not inherit the lock. The store must be on a local disk
    (flock on network file systems is not dependable).
    """

    def __init__(self, store_path: str | Path) -> None:
        self.store_path = str(store_path)
        self.path = Path(f"{store_path}.lock")
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this lease owns the store."""
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take ownership if nobody holds it; True if this lease holds it now (also when it already did)."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        self._fd = fd
        logger.info("owner of job store %s: pid %d", self.store_path, os.getpid())
        return True

    def holder(self) -> str:
        """Who owns the store, as the owner wrote it into the lock file."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            text = ""
        return text or "an unknown process"

    def acquire(self, timeout_s: float, poll_s: float = 0.2) -> None:
        """Wait up to `timeout_s` for ownership; StoreLeaseTimeout names the holder if it does not come."""
        deadline = time.monotonic() + timeout_s
        warned = False
        while not self.try_acquire():
            warned = self._still_waiting(deadline, timeout_s, warned)
            time.sleep(poll_s)

    async def acquire_async(self, timeout_s: float, poll_s: float = 0.2) -> None:
        """`acquire` for an asyncio loop: polls, so the loop goes on and a cancelled wait leaves no lock behind."""
        deadline = time.monotonic() + timeout_s
        warned = False
        while not self.try_acquire():
            warned = self._still_waiting(deadline, timeout_s, warned)
            await asyncio.sleep(poll_s)

    def release(self) -> None:
        """Give up ownership (a no-op if not held); the holder line is cleared first."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        logger.info("released job store %s", self.store_path)

    def _still_waiting(self, deadline: float, timeout_s: float, warned: bool) -> bool:
        holder = self.holder()
        if time.monotonic() >= deadline:
            raise StoreLeaseTimeout(
                f"job store {self.store_path} is still owned by {holder} after waiting {timeout_s:g} s: another engine "
                f"(a Serve replica being replaced, or a batch run) is running its jobs. Stop that process, or give "
                f"this service its own job_store file; a Serve upgrade needs max_surge_percent 0, so that the old "
                f"replica stops before the new one starts")
        if not warned:
            logger.warning("job store %s is owned by %s; waiting up to %g s for it to stop", self.store_path, holder,
                           timeout_s)
        return True


class JobStore:
    """SQLite-backed job records; safe to share between threads and asyncio tasks of one process."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        """Open (or create) the store at `path`; ":memory:" gives a private in-memory store for tests.

        `clock` returns epoch seconds; injectable so tests can pin timestamps.
        """
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._lease = StoreLease(self.path) if self.path != ":memory:" else None
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so each call is one transaction.
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
            present = {row[1] for row in self._conn.execute("PRAGMA table_info(jobs)")}
            for name, sql_type in _ADDED_COLUMNS.items():
                if name not in present:
                    self._conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {sql_type}")
        logger.info("job store at %s", self.path)

    # -- ownership ------------------------------------------------------------------------------------

    async def take_ownership(self, timeout_s: float) -> None:
        """Become the only process that runs this store's jobs (StoreLease); waits up to `timeout_s` for
        the current owner to stop, then raises StoreLeaseTimeout naming it. A no-op for ":memory:"."""
        if self._lease is not None:
            await self._lease.acquire_async(timeout_s)

    def release_ownership(self) -> None:
        """Let the next engine take over (also done by close(), and by the OS when this process ends)."""
        if self._lease is not None:
            self._lease.release()

    @property
    def owned(self) -> bool:
        """True while this store object holds ownership (always True for ":memory:")."""
        return self._lease is None or self._lease.held

    # -- writes ---------------------------------------------------------------------------------------

    def create(self, params: dict[str, Any], *, kind: JobKind = "video", priority: int = 0,
               key: str | None = None, job_id: str | None = None, total_steps: int = 0) -> JobRecord:
        """Record a newly accepted job as "queued" and return it.

        Ids look like "video_<uuid4 hex>" / "img_<uuid4 hex>" unless `job_id` is given. A `key`
        (or `job_id`) already in the store raises `DuplicateJobError` carrying the existing id.
        """
        if kind not in _ID_PREFIX:
            raise ValueError(f"kind {kind!r} is not supported; use 'video' or 'image'")
        if total_steps < 0:
            raise ValueError(f"total_steps ({total_steps}) must be >= 0")
        job_id = job_id or f"{_ID_PREFIX[kind]}_{uuid.uuid4().hex}"
        now = self._clock()
        record = JobRecord(id=job_id, kind=kind, params=params, priority=int(priority), status="queued", step=0,
                           total_steps=int(total_steps), created_at=now, updated_at=now, finished_at=None,
                           attempts=0, error=None, result_path=None, sidecar_path=None, timings={},
                           stage_times={}, key=key)
        row = _to_row(record)  # serialises params first: a non-JSON-able request fails before any write
        with self._lock:
            try:
                self._conn.execute(
                    f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})", row)
            except sqlite3.IntegrityError:
                existing = self._row_where("key = ?", key) if key is not None else None
                if existing is not None:
                    raise DuplicateJobError(f"a job with key {key!r} already exists ({existing.id}); "
                                            f"fetch it with get_by_key({key!r}) instead of creating it again",
                                            existing.id) from None
                raise DuplicateJobError(f"job id {job_id!r} already exists; omit job_id to get a fresh one",
                                        job_id) from None
        logger.debug("job %s created (kind=%s, priority=%d, key=%s)", job_id, kind, priority, key)
        return _from_row(row)  # a private copy: later changes to the caller's params do not leak in

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        """Change the given fields of one job and return the new record.

        `timings` and `stage_times` merge into the stored dicts (a stage given again is replaced).
        The first terminal status sets `finished_at` and freezes the progress; a terminal job's
        status cannot change afterwards. Unknown fields raise TypeError, unknown ids KeyError.
        """
        unknown = set(fields) - UPDATABLE_FIELDS
        if unknown:
            raise TypeError(f"cannot update {sorted(unknown)} of a job; updatable fields are "
                            f"{sorted(UPDATABLE_FIELDS)}")
        with self._lock, self._transaction():
            return self._update_locked(job_id, fields)

    def mark_stage(self, job_id: str, stage: str, start: bool, **fields: Any) -> JobRecord:
        """Record now as the start (`start=True`) or end of `stage`, to show when stages overlapped; an end
        also records the stage's seconds in `timings`. `fields` are updated in the same transaction (one
        commit per stage change, e.g. the new status), as `update` takes them.

        A start replaces any earlier interval of that stage (a retry starts afresh); an end
        needs a start first.
        """
        unknown = set(fields) - UPDATABLE_FIELDS
        if unknown:
            raise TypeError(f"cannot update {sorted(unknown)} of a job; updatable fields are "
                            f"{sorted(UPDATABLE_FIELDS)}")
        with self._lock, self._transaction():
            current = self._get_locked(job_id)
            now = self._clock()
            if start:
                interval = [now]
            else:
                previous = current.stage_times.get(stage)
                if not previous:
                    raise ValueError(f"stage {stage!r} of job {job_id} was never started; call "
                                     f"mark_stage({job_id!r}, {stage!r}, start=True) first")
                interval = [previous[0], now]
                fields = {**fields, "timings": {**fields.get("timings", {}), stage: now - previous[0]}}
            return self._update_locked(job_id, {**fields, "stage_times": {stage: interval}}, current, now)

    def delete(self, job_id: str) -> bool:
        """Remove a job's record; False if there was none."""
        with self._lock:
            cursor = self._conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return cursor.rowcount > 0

    # -- reads ----------------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        """The job with this id, or None."""
        with self._lock:
            return self._row_where("id = ?", job_id)

    def get_by_key(self, key: str) -> JobRecord | None:
        """The job created with this caller key, or None (lets a batch runner resume idempotently)."""
        with self._lock:
            return self._row_where("key = ?", key)

    def list(self, *, limit: int = 100, after: str | None = None,
             status: JobStatus | None = None) -> builtins.list[JobRecord]:
        """Up to `limit` jobs, newest first; pass the last id of a page as `after` for the next page."""
        if limit < 1:
            raise ValueError(f"limit ({limit}) must be >= 1")
        if status is not None and status not in STATUSES:
            raise ValueError(f"status {status!r} is unknown; use one of {sorted(STATUSES)}")
        where: builtins.list[str] = []
        args: builtins.list[Any] = []
        with self._lock:
            if after is not None:
                row = self._conn.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
                if row is None:
                    raise KeyError(f"cursor job {after!r} is not in the store; restart listing without 'after'")
                where.append("seq < ?")
                args.append(row[0])
            if status is not None:
                where.append("status = ?")
                args.append(status)
            sql = _SELECT + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY seq DESC LIMIT ?"
            rows = self._conn.execute(sql, (*args, limit)).fetchall()
        return [_from_row(r) for r in rows]

    def unfinished(self) -> builtins.list[JobRecord]:
        """Jobs not yet succeeded, failed or cancelled, oldest first: what a restart must resume or fail."""
        marks = ", ".join("?" * len(TERMINAL_STATUSES))
        with self._lock:
            rows = self._conn.execute(f"{_SELECT} WHERE status NOT IN ({marks}) ORDER BY seq ASC",
                                      tuple(sorted(TERMINAL_STATUSES))).fetchall()
        return [_from_row(r) for r in rows]

    def close(self) -> None:
        """Close the connection and give up ownership; later calls raise sqlite3.ProgrammingError."""
        with self._lock:
            self._conn.close()
        self.release_ownership()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals (callers hold self._lock) ----------------------------------------------------------

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn)

    def _row_where(self, condition: str, value: str) -> JobRecord | None:
        row = self._conn.execute(f"{_SELECT} WHERE {condition}", (value,)).fetchone()
        return _from_row(row) if row is not None else None

    def _get_locked(self, job_id: str) -> JobRecord:
        record = self._row_where("id = ?", job_id)
        if record is None:
            raise KeyError(f"job {job_id!r} is not in the store")
        return record

    def _update_locked(self, job_id: str, fields: dict[str, Any], current: JobRecord | None = None,
                       now: float | None = None) -> JobRecord:
        current = current or self._get_locked(job_id)
        changes = dict(fields)
        status = changes.get("status", current.status)
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is unknown; use one of {sorted(STATUSES)}")
        if current.done and status != current.status:
            raise ValueError(f"job {job_id} is already {current.status}; a finished job's status cannot "
                             f"change to {status!r}")
        step = changes.get("step", current.step)
        total = changes.get("total_steps", current.total_steps)
        if step < 0 or total < 0 or (total > 0 and step > total):
            raise ValueError(f"step ({step}) must lie in [0, total_steps ({total})] for job {job_id}")
        if "timings" in changes:
            changes["timings"] = {**current.timings, **{k: float(v) for k, v in changes["timings"].items()}}
        if "stage_times" in changes:
            changes["stage_times"] = {**current.stage_times,
                                      **{k: [float(t) for t in v] for k, v in changes["stage_times"].items()}}
        now = self._clock() if now is None else now
        changes["updated_at"] = now
        if status in TERMINAL_STATUSES and not current.done:
            changes["finished_at"] = now
            if status != "succeeded":
                changes["progress_at_stop"] = progress_of(current.status, step, total)
        record = replace(current, **changes)
        row = dict(zip(_COLUMNS, _to_row(record)))
        names = [c for c in _COLUMNS if c in changes]
        self._conn.execute(f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in names)} WHERE id = ?",
                           (*(row[c] for c in names), job_id))
        return record


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): read-modify-write happens as one unit."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self._conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _to_row(record: JobRecord) -> tuple[Any, ...]:
    values = asdict(record)
    for name in _JSON_COLUMNS:
        try:
            values[name] = json.dumps(values[name], allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} of job {record.id} must be JSON-able (str, numbers, bools, None, "
                            f"lists, dicts with str keys): {exc}") from None
    return tuple(values[c] for c in _COLUMNS)


def _from_row(row: tuple[Any, ...]) -> JobRecord:
    values = dict(zip(_COLUMNS, row))
    for name in _JSON_COLUMNS:
        values[name] = json.loads(values[name]) if values[name] is not None else None
    return JobRecord(**values)
