"""The out-of-band stop of a rank's run (actors/step_control.py), with real threads: where a hold lands, that a
held run waits for its stop step, that ranks held at different boundaries all stop at the largest."""

from __future__ import annotations

import threading
import time

import pytest

from actors.step_control import StepControl, StepControls


def _run(control: StepControl, start: int, end: int, step_s: float, done: list[int]) -> threading.Thread:
    """A run thread like DiTRankActor.run_steps: steps from `start` until `end` or the stop step; `done` gets
    its last step."""
    def loop() -> None:
        step = start
        while step < end and control.proceed(timeout_s=10):
            time.sleep(step_s)
            control.stepped()
            step += 1
        control.ended()
        done.append(step)

    thread = threading.Thread(target=loop)
    thread.start()
    return thread


def test_hold_answers_the_next_boundary_and_the_run_stops_there() -> None:
    control = StepControl(run_id=1, step=0)
    done: list[int] = []
    thread = _run(control, 0, end=1000, step_s=0.01, done=done)
    time.sleep(0.05)
    boundary = control.hold()
    control.stop_at(boundary)
    thread.join(5)
    assert done == [boundary] and 1 <= boundary < 1000


def test_held_run_waits_for_its_stop_step_then_runs_on_to_it() -> None:
    control = StepControl(run_id=1, step=3)
    assert control.hold() == 3  # not started: it holds at its first step
    done: list[int] = []
    thread = _run(control, 3, end=10, step_s=0.001, done=done)
    time.sleep(0.1)
    assert done == [] and thread.is_alive()  # held, waiting
    control.stop_at(5)  # another rank answered 5
    thread.join(5)
    assert done == [5]


def test_ranks_held_at_different_boundaries_all_stop_at_the_largest() -> None:
    """Rank 0 between steps at 4, rank 1 inside step 5: both stop at 5 (rank 0 runs the one step more)."""
    rank0, rank1 = StepControl(run_id=1, step=4), StepControl(run_id=1, step=4)
    assert rank1.proceed()  # rank 1 started step 5
    answers = [rank0.hold(), rank1.hold()]
    assert answers == [4, 5]
    for control in (rank0, rank1):
        control.stop_at(max(answers))
    rank1.stepped()
    assert not rank1.proceed()  # rank 1 stands at 5
    assert rank0.proceed()  # rank 0 runs step 5 ...
    rank0.stepped()
    assert not rank0.proceed()  # ... and stops there too


def test_first_stop_step_stays_and_a_finished_run_answers_its_last_step() -> None:
    control = StepControl(run_id=1, step=7)
    control.ended()
    assert control.hold() == 7
    control.stop_at(7)
    control.stop_at(9)  # a second decision cannot move the stop: every rank got the first
    assert not control.proceed()


def test_held_run_without_a_stop_step_fails_after_its_timeout() -> None:
    control = StepControl(run_id=1, step=0)
    control.hold()
    with pytest.raises(TimeoutError, match="held at step 0 and got no stop step within 0.05 s"):
        control.proceed(timeout_s=0.05)


def test_controls_are_per_run_and_stale_runs_are_ignored() -> None:
    controls = StepControls()
    first = controls.get("job", run_id=1, step=0)
    assert first is not None and controls.get("job", 1, 0) is first
    second = controls.get("job", run_id=2, step=3)  # the job's next run replaces it
    assert second is not None and second is not first
    assert controls.get("job", run_id=1, step=3) is None  # a stop for the old run must not touch the new one
    controls.forget("job")
    assert controls.get("job", 1, 0) is not None
