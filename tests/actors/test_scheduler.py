"""Stage scheduler policy: ordering, chunk-boundary priorities, admission, cancel, retry, invariants."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from actors.scheduler import STAGES, QueueFull, StageScheduler

REPO = Path(__file__).resolve().parents[2]


def assert_consistent(s: StageScheduler, expected: set[str]) -> None:
    """Every job in the system sits in exactly one queue or running set, matching stage_of."""
    seen: dict[str, tuple[str, bool]] = {}
    for stage in STAGES:
        for job_id in s.queued(stage):
            assert job_id not in seen, f"{job_id} is in two places"
            seen[job_id] = (stage, False)
        for job_id in s.running(stage):
            assert job_id not in seen, f"{job_id} is in two places"
            seen[job_id] = (stage, True)
        assert s.depth(stage) == len(s.queued(stage))
        flags = [s.is_cancelled(j) for j in s.queued(stage)]
        assert flags == sorted(flags, reverse=True), f"cancelled jobs must lead the {stage} queue"
    assert set(seen) == expected
    assert s.pending == len(expected)
    for job_id, place in seen.items():
        assert s.stage_of(job_id) == place


def test_fifo_within_a_priority_and_higher_priority_first() -> None:
    s = StageScheduler(max_pending=10)
    for job_id, prio in [("a", 0), ("b", 0), ("hi", 5), ("c", 0), ("lo", -1), ("hi2", 5)]:
        s.submit(job_id, priority=prio)
    assert s.queued("encode") == ["hi", "hi2", "a", "b", "c", "lo"]
    assert s.take_encode(max_batch=100) == ["hi", "hi2", "a", "b", "c", "lo"]
    for job_id in ["lo", "c", "a", "hi2", "b", "hi"]:  # encodes return in any order
        s.encoded(job_id)
    assert s.queued("denoise") == ["hi", "hi2", "a", "b", "c", "lo"]


def test_batch_encode_takes_up_to_n_in_order() -> None:
    s = StageScheduler(max_pending=10)
    for i in range(5):
        s.submit(f"j{i}")
    assert s.take_encode(max_batch=2) == ["j0", "j1"]
    assert s.running("encode") == ["j0", "j1"]
    assert s.take_encode(max_batch=2) == ["j2", "j3"]
    assert s.take_encode(max_batch=2) == ["j4"]
    assert s.take_encode(max_batch=2) == []
    assert s.depth("encode") == 0 and len(s.running("encode")) == 5
    with pytest.raises(ValueError, match=r"max_batch \(0\) must be >= 1"):
        s.take_encode(0)


def _to_denoise_queue(s: StageScheduler, *job_ids: str) -> None:
    taken = s.take_encode(max_batch=len(job_ids))
    assert taken == list(job_ids)
    for job_id in taken:
        s.encoded(job_id)


def test_a_job_between_chunks_keeps_its_place_but_a_higher_priority_newcomer_overtakes() -> None:
    s = StageScheduler(max_pending=10)
    s.submit("first")
    s.submit("second")
    _to_denoise_queue(s, "first", "second")
    assert s.take_denoise() == "first"
    s.chunk_done("first", finished=False)
    assert s.take_denoise() == "first"  # same sequence number: still ahead of "second"

    s.submit("urgent", priority=1)
    _to_denoise_queue(s, "urgent")
    s.chunk_done("first", finished=False)  # chunk boundary
    assert s.queued("denoise") == ["urgent", "first", "second"]
    assert s.take_denoise() == "urgent"
    s.chunk_done("urgent", finished=True)
    assert s.take_denoise() == "first"  # resumes ahead of the later same-priority job
    assert s.queued("decode") == ["urgent"]


def test_queue_full_at_the_limit_and_accepted_again_after_a_finish() -> None:
    s = StageScheduler(max_pending=2)
    s.submit("a")
    s.submit("b")
    s.take_encode(1)  # running jobs count as much as queued ones
    with pytest.raises(QueueFull, match=r"limit 2\); retry later") as info:
        s.submit("c")
    assert (info.value.pending, info.value.limit) == (2, 2)
    assert s.stage_of("c") is None and s.pending == 2
    assert s.finish("a") is True
    s.submit("c")
    assert s.queued("encode") == ["b", "c"]


def test_duplicate_submit_and_bad_limits_raise() -> None:
    s = StageScheduler(max_pending=3)
    s.submit("a")
    with pytest.raises(ValueError, match="job a is already scheduled"):
        s.submit("a", priority=3)
    assert s.pending == 1
    with pytest.raises(ValueError, match=r"max_pending \(0\) must be >= 1"):
        StageScheduler(max_pending=0)


def test_cancel_queued_removes_at_once_and_running_is_flagged_until_finish() -> None:
    s = StageScheduler(max_pending=5)
    for job_id in ["run", "wait", "denoise_wait"]:
        s.submit(job_id)
    assert s.take_encode(1) == ["run"]
    s.take_encode(2)
    s.encoded("wait")
    s.encoded("denoise_wait")
    assert s.take_denoise() == "wait"
    s.chunk_done("wait", finished=False)

    assert s.cancel("denoise_wait") == "removed"
    assert s.stage_of("denoise_wait") is None and not s.is_cancelled("denoise_wait")
    assert s.queued("denoise") == ["wait"]

    assert s.cancel("run") == "running"
    assert s.is_cancelled("run") and s.stage_of("run") == ("encode", True)
    assert s.snapshot()["cancelling"] == 1
    assert s.finish("run") is True  # the engine stopped it
    assert not s.is_cancelled("run") and s.pending == 1

    assert s.cancel("nope") == "unknown"
    assert s.finish("nope") is False
    assert_consistent(s, {"wait"})


def test_a_flagged_job_that_moves_on_keeps_its_flag_and_is_handed_back_first() -> None:
    """If the engine reports a boundary before noticing the flag, the job is not lost or run on."""
    s = StageScheduler(max_pending=5)
    s.submit("low")
    s.submit("high", priority=9)
    s.take_encode(2)
    s.encoded("high")
    assert s.take_denoise() == "high"
    s.encoded("low")
    assert s.cancel("low") == "removed"
    s.submit("low2")
    s.take_encode(1)
    s.encoded("low2")
    assert s.cancel("high") == "running"
    s.chunk_done("high", finished=False)  # the chunk returned; the engine requeued it anyway
    assert s.stage_of("high") == ("denoise", False) and s.is_cancelled("high")
    assert s.cancel("high") == "running"  # still being stopped, not silently removed
    s.submit("urgent", priority=99)
    s.take_encode(1)
    s.encoded("urgent")
    assert s.take_denoise() == "high"  # clean-up first, even ahead of a higher priority
    s.retry("high", "denoise")  # e.g. its group died while dropping it: still flagged, still first
    assert s.queued("denoise")[0] == "high" and s.is_cancelled("high")
    assert s.take_denoise() == "high"
    s.finish("high")
    assert s.snapshot()["cancelling"] == 0
    assert_consistent(s, {"low2", "urgent"})


def test_take_denoise_respects_an_eligibility_filter() -> None:
    """E.g. between chunks a job's state lives on one DiT group, so only that group may take it."""
    s = StageScheduler(max_pending=5)
    for job_id in ["on_group_1", "fresh", "later"]:
        s.submit(job_id)
    s.take_encode(3)
    for job_id in ["on_group_1", "fresh", "later"]:
        s.encoded(job_id)
    owner = {"on_group_1": 1}
    assert s.take_denoise(lambda j: owner.get(j, 0) == 0) == "fresh"  # group 0 skips group 1's job
    assert s.take_denoise(lambda j: owner.get(j, 1) == 1) == "on_group_1"
    assert s.take_denoise(lambda j: False) is None
    assert s.queued("denoise") == ["later"]
    assert_consistent(s, {"on_group_1", "fresh", "later"})


def test_retry_goes_to_the_head_of_its_priority_class() -> None:
    s = StageScheduler(max_pending=10)
    for job_id, prio in [("a", 0), ("b", 0), ("c", 0), ("hi", 1)]:
        s.submit(job_id, priority=prio)
    assert s.take_encode(2) == ["hi", "a"]
    s.encoded("hi")
    assert s.take_denoise() == "hi"
    s.retry("a", "encode")  # encoder died: back ahead of b and c, but not ahead of higher priority
    s.submit("hi2", priority=1)
    assert s.queued("encode") == ["hi2", "a", "b", "c"]

    s.retry("hi", "denoise")  # DiT group died mid-denoise
    assert s.stage_of("hi") == ("denoise", False)
    assert s.take_denoise() == "hi"
    with pytest.raises(ValueError, match="job b is queued in encode; only a running job can be retried"):
        s.retry("b", "encode")
    with pytest.raises(ValueError, match="stage 'vae' is unknown; use one of encode, denoise, decode"):
        s.retry("hi", "vae")
    assert_consistent(s, {"a", "b", "c", "hi", "hi2"})


def test_a_retried_job_goes_before_an_earlier_submitted_job_that_waits() -> None:
    s = StageScheduler(max_pending=10)
    s.submit("a")
    s.submit("b")
    s.take_encode(2)
    s.encoded("b")  # b's encode returned first...
    assert s.take_denoise() == "b"
    s.encoded("a")  # ...so a, submitted earlier, now waits behind the running b
    s.retry("b", "denoise")  # the DiT group died: b is not sent to the back
    assert s.queued("denoise") == ["b", "a"]
    assert s.take_denoise() == "b"
    s.chunk_done("b", finished=False)  # after the retried placement, normal FIFO applies again
    assert s.queued("denoise") == ["a", "b"]


def test_several_retries_keep_submission_order_among_themselves() -> None:
    s = StageScheduler(max_pending=10)
    for i in range(4):
        s.submit(f"j{i}")
    batch = s.take_encode(3)
    for job_id in reversed(batch):  # the engine may report them in any order
        s.retry(job_id, "encode")
    assert s.queued("encode") == ["j0", "j1", "j2", "j3"]


def test_three_jobs_interleave_across_stages() -> None:
    s = StageScheduler(max_pending=3)
    for job_id in ["j1", "j2", "j3"]:
        s.submit(job_id)
    assert s.take_encode(1) == ["j1"]
    s.encoded("j1")
    assert s.take_denoise() == "j1"
    assert s.take_encode(1) == ["j2"]  # j2 encodes while j1 denoises
    assert s.snapshot()["stages"] == {"encode": {"queued": 1, "running": 1},
                                      "denoise": {"queued": 0, "running": 1},
                                      "decode": {"queued": 0, "running": 0}}
    s.encoded("j2")
    # One DiT group, busy with j1: the engine takes no denoise work until j1's chunk returns.
    assert s.queued("denoise") == ["j2"] and s.running("denoise") == ["j1"]
    s.chunk_done("j1", finished=True)
    assert s.take_denoise() == "j2"
    assert s.take_decode() == "j1"
    assert s.take_encode(4) == ["j3"]  # all three stages busy at once
    assert [s.running(st) for st in STAGES] == [["j3"], ["j2"], ["j1"]]
    assert_consistent(s, {"j1", "j2", "j3"})
    s.decoded("j1")
    s.encoded("j3")
    s.chunk_done("j2", finished=False)
    assert s.take_denoise() == "j2"
    s.chunk_done("j2", finished=True)
    assert s.take_denoise() == "j3"
    assert s.take_decode() == "j2"
    s.decoded("j2")
    s.chunk_done("j3", finished=True)
    assert s.take_decode() == "j3"
    s.decoded("j3")
    assert_consistent(s, set())
    assert s.snapshot() == {"pending": 0, "max_pending": 3, "cancelling": 0,
                            "stages": {st: {"queued": 0, "running": 0} for st in STAGES}}


def test_results_are_accepted_only_from_the_stage_a_job_runs_in() -> None:
    s = StageScheduler(max_pending=3)
    s.submit("a")
    with pytest.raises(ValueError, match="job a is queued in encode, not running in encode"):
        s.encoded("a")
    s.take_encode(1)
    with pytest.raises(ValueError, match="job a is running in encode, not running in denoise"):
        s.chunk_done("a", finished=True)
    with pytest.raises(ValueError, match="job ghost is not scheduled, not running in decode"):
        s.decoded("ghost")
    with pytest.raises(ValueError, match="stage 'vae' is unknown"):
        s.depth("vae")
    assert s.stage_of("a") == ("encode", True)


def test_random_walk_keeps_every_job_in_exactly_one_place() -> None:
    """Drive many mixed operations and check the invariants after each one (deterministic seed)."""
    import random

    rng = random.Random(0)
    s = StageScheduler(max_pending=6)
    live: set[str] = set()
    for n in range(600):
        op = rng.randrange(7)
        if op == 0:
            try:
                s.submit(f"j{n}", priority=rng.randrange(3))
                live.add(f"j{n}")
            except QueueFull:
                assert s.pending == 6
        elif op == 1:
            s.take_encode(rng.randrange(1, 4))
        elif op == 2:
            s.take_denoise()
        elif op == 3:
            s.take_decode()
        elif live:
            job_id = rng.choice(sorted(live))
            stage, running = s.stage_of(job_id)  # type: ignore[misc]
            if op == 4 and running:
                {"encode": lambda: s.encoded(job_id),
                 "denoise": lambda: s.chunk_done(job_id, finished=rng.random() < 0.3),
                 "decode": lambda: s.decoded(job_id)}[stage]()
            elif op == 5 and running:
                s.retry(job_id, stage)
            elif op == 6:
                was_flagged = s.is_cancelled(job_id)
                outcome = s.cancel(job_id)
                assert outcome == ("running" if running or was_flagged else "removed")
                if outcome == "running" and rng.random() < 0.5:
                    s.finish(job_id)  # else the flagged job moves on and is finished later
        live = {j for j in live if s.stage_of(j) is not None}
        assert_consistent(s, live)


def test_scheduler_and_job_store_import_neither_torch_nor_ray() -> None:
    code = ("import sys, actors.scheduler, actors.job_store; "
            "bad = [m for m in ('torch', 'ray') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
