"""Job store: records, pagination, merged updates, terminal states, persistence, thread safety, ownership."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.job_store import (_SCHEMA, TERMINAL_STATUSES, DuplicateJobError, JobRecord, JobStore, StoreLease,
                              StoreLeaseTimeout, progress_of)


class FakeClock:
    """Deterministic epoch seconds: each reading advances by one second."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def store() -> Iterator[JobStore]:
    s = JobStore(":memory:", clock=FakeClock())
    yield s
    s.close()


def test_create_and_get_round_trip(store: JobStore) -> None:
    params = {"prompt": "a cat surfing", "steps": 4, "size": [480, 832], "seed": None}
    rec = store.create(params, priority=2, key="prompt-7", total_steps=4)
    assert rec.id.startswith("video_") and len(rec.id) == len("video_") + 32
    assert (rec.status, rec.step, rec.total_steps, rec.attempts, rec.priority) == ("queued", 0, 4, 0, 2)
    assert rec.created_at == rec.updated_at == 1001.0 and rec.finished_at is None
    assert (rec.timings, rec.stage_times, rec.error, rec.result_path) == ({}, {}, None, None)
    assert store.get(rec.id) == rec
    assert store.get_by_key("prompt-7") == rec
    params["prompt"] = "changed later by the caller"
    assert store.get(rec.id).params["prompt"] == "a cat surfing"
    assert rec.params["prompt"] == "a cat surfing"

    img = store.create({"prompt": "p"}, kind="image")
    assert img.id.startswith("img_") and img.kind == "image"
    assert store.create({}, job_id="custom").id == "custom"
    assert store.get("missing") is None and store.get_by_key("missing") is None


def test_create_rejects_bad_input_before_writing(store: JobStore) -> None:
    with pytest.raises(ValueError, match="kind 'audio' is not supported"):
        store.create({}, kind="audio")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="params of job .* must be JSON-able"):
        store.create({"latents": object()})
    assert store.list() == []


def test_duplicate_key_and_id_name_the_existing_job(store: JobStore) -> None:
    first = store.create({"prompt": "a"}, key="k1")
    with pytest.raises(DuplicateJobError, match=rf"key 'k1' already exists \({first.id}\); fetch it with "
                                                r"get_by_key\('k1'\)") as info:
        store.create({"prompt": "b"}, key="k1")
    assert info.value.existing_id == first.id
    with pytest.raises(DuplicateJobError, match=f"job id '{first.id}' already exists"):
        store.create({}, job_id=first.id)
    assert len(store.list()) == 1
    store.create({}, key=None)  # keys are optional: many jobs may have none
    store.create({}, key=None)
    assert len(store.list()) == 3


def test_list_is_newest_first_with_cursor_pagination_and_status_filter(store: JobStore) -> None:
    ids = [store.create({"i": i}).id for i in range(7)]
    store.update(ids[1], status="encoding")
    store.update(ids[4], status="encoding")
    store.update(ids[5], status="failed", error="boom")

    page1 = store.list(limit=3)
    assert [r.id for r in page1] == [ids[6], ids[5], ids[4]]
    page2 = store.list(limit=3, after=page1[-1].id)
    assert [r.id for r in page2] == [ids[3], ids[2], ids[1]]
    page3 = store.list(limit=3, after=page2[-1].id)
    assert [r.id for r in page3] == [ids[0]]
    assert store.list(limit=3, after=ids[0]) == []

    assert [r.id for r in store.list(status="encoding")] == [ids[4], ids[1]]
    assert [r.id for r in store.list(status="encoding", after=ids[4])] == [ids[1]]
    assert [r.id for r in store.list(status="failed")] == [ids[5]]
    with pytest.raises(KeyError, match="cursor job 'gone' is not in the store"):
        store.list(after="gone")
    with pytest.raises(ValueError, match="status 'running' is unknown"):
        store.list(status="running")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"limit \(0\) must be >= 1"):
        store.list(limit=0)


def test_update_merges_timings_and_stage_times_and_terminal_status_sets_finished_at(store: JobStore) -> None:
    rec = store.create({"prompt": "p"}, total_steps=10)
    rec = store.update(rec.id, status="encoding", attempts=1, timings={"queue": 0.5},
                       stage_times={"encode": [10.0, 11.0]})
    assert rec.finished_at is None and rec.updated_at > rec.created_at
    rec = store.update(rec.id, status="denoising", step=4, timings={"encode": 1.25},
                       stage_times={"denoise": [11.0, 20.0]})
    assert rec.timings == {"queue": 0.5, "encode": 1.25}
    assert rec.stage_times == {"encode": [10.0, 11.0], "denoise": [11.0, 20.0]}
    rec = store.update(rec.id, timings={"queue": 0.75})  # a stage given again is replaced
    assert rec.timings == {"queue": 0.75, "encode": 1.25}
    assert rec.finished_at is None

    done = store.update(rec.id, status="succeeded", step=10, result_path="/out/x.mp4", sidecar_path="/out/x.json")
    assert done.done and done.finished_at == done.updated_at
    assert store.get(rec.id) == done
    later = store.update(rec.id, timings={"total": 3.0})  # bookkeeping after the end is fine...
    assert later.finished_at == done.finished_at and later.timings["total"] == 3.0
    with pytest.raises(ValueError, match="already succeeded; a finished job's status cannot change to 'failed'"):
        store.update(rec.id, status="failed")  # ...but a finished job cannot be re-opened or re-labelled
    assert store.get(rec.id).status == "succeeded"


def test_update_rejects_unknown_jobs_fields_and_values(store: JobStore) -> None:
    with pytest.raises(KeyError, match="job 'ghost' is not in the store"):
        store.update("ghost", status="encoding")
    with pytest.raises(KeyError, match="ghost"):
        store.mark_stage("ghost", "encode", start=True)
    rec = store.create({}, total_steps=5)
    with pytest.raises(TypeError, match=r"cannot update \['created_at', 'params'\]"):
        store.update(rec.id, params={}, created_at=0.0)
    with pytest.raises(ValueError, match="status 'running' is unknown"):
        store.update(rec.id, status="running")
    with pytest.raises(ValueError, match=r"step \(6\) must lie in \[0, total_steps \(5\)\]"):
        store.update(rec.id, step=6)
    assert store.get(rec.id) == rec  # failed updates leave no trace


def test_mark_stage_records_start_then_end(store: JobStore) -> None:
    rec = store.create({})
    with pytest.raises(ValueError, match="stage 'decode' of job .* was never started"):
        store.mark_stage(rec.id, "decode", start=False)
    assert store.mark_stage(rec.id, "encode", start=True).stage_times == {"encode": [1003.0]}
    store.mark_stage(rec.id, "denoise", start=True)
    rec = store.mark_stage(rec.id, "encode", start=False)
    assert rec.stage_times == {"encode": [1003.0, 1005.0], "denoise": [1004.0]}
    assert rec.updated_at == 1005.0 and rec.timings == {"encode": 2.0}  # an end records the stage's seconds
    rec = store.mark_stage(rec.id, "encode", start=True)  # a retry starts the stage afresh
    assert rec.stage_times["encode"] == [1006.0]
    # a stage change and the other fields it brings are one transaction
    rec = store.mark_stage(rec.id, "denoise", start=False, status="decoding", step=0)
    assert (rec.status, rec.stage_times["denoise"], rec.timings["denoise"]) == ("decoding", [1004.0, 1007.0], 3.0)
    with pytest.raises(TypeError, match="cannot update"):
        store.mark_stage(rec.id, "decode", start=True, colour="red")


def test_progress_formula_and_frozen_value_after_failure_or_cancel(store: JobStore) -> None:
    assert [progress_of(s, 0, 0) for s in ("queued", "encoding", "denoising", "decoding", "succeeded")] == \
        [0.0, 0.02, 0.05, 0.92, 1.0]
    assert progress_of("denoising", 5, 10) == pytest.approx(0.05 + 0.85 * 0.5)
    assert progress_of("denoising", 10, 10) == pytest.approx(0.90)
    with pytest.raises(ValueError, match="status 'failed' has no progress of its own"):
        progress_of("failed", 0, 0)

    rec = store.create({}, total_steps=8)
    assert rec.progress == 0.0
    rec = store.update(rec.id, status="denoising", step=2)
    assert rec.progress == pytest.approx(0.05 + 0.85 * 0.25)
    failed = store.update(rec.id, status="failed", error="DiT group lost twice")
    assert failed.progress == pytest.approx(0.05 + 0.85 * 0.25)
    assert store.get(rec.id).progress == failed.progress

    early = store.create({})
    store.update(early.id, status="encoding")
    assert store.update(early.id, status="cancelled").progress == 0.02
    assert store.update(store.create({}).id, status="succeeded").progress == 1.0

    as_json = json.loads(json.dumps(failed.to_dict()))
    assert as_json["progress"] == pytest.approx(failed.progress) and as_json["done"] is True
    assert "progress_at_stop" not in as_json and as_json["error"] == "DiT group lost twice"
    assert set(as_json) - {"progress", "done"} == set(JobRecord.__dataclass_fields__) - {"progress_at_stop"}


def test_unfinished_lists_live_jobs_oldest_first(store: JobStore) -> None:
    a, b, c, d = (store.create({"i": i}) for i in range(4))
    store.update(b.id, status="succeeded")
    store.update(d.id, status="denoising", step=1)
    store.update(c.id, status="cancelled")
    assert [r.id for r in store.unfinished()] == [a.id, d.id]
    assert all(r.status not in TERMINAL_STATUSES for r in store.unfinished())


def test_delete(store: JobStore) -> None:
    rec = store.create({}, key="k")
    assert store.delete(rec.id) is True
    assert store.delete(rec.id) is False
    assert store.get(rec.id) is None
    store.create({}, key="k")  # the key is free again


def test_jobs_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "jobs.sqlite"
    first = JobStore(path)
    done = first.create({"prompt": "finished"}, key="p0")
    first.update(done.id, status="succeeded", result_path="/out/a.mp4", timings={"decode": 2.0})
    live = first.create({"prompt": "in flight"}, kind="image", priority=3, total_steps=20)
    live = first.update(live.id, status="denoising", step=7, stage_times={"encode": [1.0, 2.0]})
    first.close()
    with pytest.raises(sqlite3.ProgrammingError):
        first.get(live.id)

    with JobStore(path) as second:
        assert [r.id for r in second.unfinished()] == [live.id]
        assert second.get(live.id) == live
        assert second.get_by_key("p0").result_path == "/out/a.mp4"
        assert [r.id for r in second.list()] == [live.id, done.id]
        with pytest.raises(DuplicateJobError):
            second.create({}, key="p0")
        mode = second._conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_concurrent_updates_from_threads_and_two_stores_lose_nothing(tmp_path: Path) -> None:
    """Threads share one store; a second store on the same file stands in for a second process."""
    path = tmp_path / "jobs.sqlite"
    stores = [JobStore(path), JobStore(path)]
    job = stores[0].create({}, total_steps=1000)
    n_threads, n_updates = 4, 25
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        store = stores[t % 2]
        try:
            own = store.create({"thread": t}, key=f"t{t}")
            for i in range(n_updates):
                store.update(job.id, timings={f"t{t}_{i}": float(i)})  # read-modify-write on one row
                store.update(own.id, step=i)
                store.list(limit=5)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    final = stores[1].get(job.id)
    assert len(final.timings) == n_threads * n_updates  # no merge was lost to a race
    assert all(stores[0].get_by_key(f"t{t}").step == n_updates - 1 for t in range(n_threads))
    for store in stores:
        store.close()


# A second process that owns the store until told (one stdin line) to close it, then waits for another line.
_OWNER = """
import asyncio, sys
from actors.job_store import JobStore
store = JobStore(sys.argv[1])
asyncio.run(store.take_ownership(10))
print("owned", flush=True)
sys.stdin.readline()
store.close()
print("closed", flush=True)
sys.stdin.readline()
"""


def _owner_process(path: Path) -> subprocess.Popen[str]:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", _OWNER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "owned"
    return proc


def test_ownership_excludes_another_process_names_it_and_passes_on_close_or_death(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    owner = _owner_process(path)
    try:
        lease = StoreLease(path)
        assert not lease.try_acquire() and not lease.held
        started = time.monotonic()
        with pytest.raises(StoreLeaseTimeout, match=rf"owned by pid {owner.pid} on .* after waiting 0.3 s"):
            lease.acquire(timeout_s=0.3, poll_s=0.05)
        assert 0.3 <= time.monotonic() - started < 2
        assert owner.stdin is not None and owner.stdout is not None
        owner.stdin.write("close\n")
        owner.stdin.flush()
        assert owner.stdout.readline().strip() == "closed"
        assert lease.try_acquire() and lease.held  # close() gave it up at once, though the process lives on
        lease.release()
    finally:
        owner.kill()
        owner.wait()

    killed = _owner_process(path)
    os.kill(killed.pid, signal.SIGKILL)  # no chance to clean up: the OS drops the lock with the process
    killed.wait()
    store = JobStore(path)
    started = time.monotonic()
    asyncio.run(store.take_ownership(timeout_s=10))
    assert store.owned and time.monotonic() - started < 1
    store.close()
    assert not store.owned


def test_two_stores_in_one_process_exclude_each_other(tmp_path: Path) -> None:
    first, second = JobStore(tmp_path / "jobs.sqlite"), JobStore(tmp_path / "jobs.sqlite")
    asyncio.run(first.take_ownership(timeout_s=1))
    with pytest.raises(StoreLeaseTimeout, match=f"pid {os.getpid()}"):
        asyncio.run(second.take_ownership(timeout_s=0.2))
    assert first.owned and not second.owned
    assert second.create({"prompt": "reads and writes need no ownership"}).status == "queued"
    first.release_ownership()
    asyncio.run(second.take_ownership(timeout_s=1))
    assert second.owned
    first.close()
    second.close()
    memory = JobStore(":memory:")
    asyncio.run(memory.take_ownership(timeout_s=0.1))
    assert memory.owned


def test_cache_counts_round_trip_and_a_store_from_before_the_column_opens(tmp_path: Path) -> None:
    """A job's feature-cache counts are stored as JSON; a store written before the column existed gains it."""
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(_SCHEMA.replace(",\n    cache TEXT", ""))
    assert "cache" not in {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    conn.close()
    store = JobStore(path)
    job = store.create({"prompt": "p"})
    assert job.cache is None and store.get(job.id).cache is None
    counts = {"forwards_computed": 3, "forwards_reused": 2, "blocks_computed": 9, "blocks_reused": 6,
              "peak_extra_bytes": 1024}
    store.update(job.id, cache=counts)
    store.close()
    reopened = JobStore(path)
    assert reopened.get(job.id).cache == counts  # survives a reopen
    reopened.close()
