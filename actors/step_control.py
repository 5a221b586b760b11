"""Where a rank's run of denoising steps stops, decided out of band while it runs.

One dispatch runs many steps (all that are left, by default), so cancellation and preemption can
no longer wait for the dispatch to end; they reach the ranks through a second thread (the rank
actor's control concurrency group) and take effect at a step boundary. Every rank of a group must
stop at the SAME step: the forwards contain collectives, so a rank that stopped one step early
would leave the others waiting in that step's collective. Without a per-step collective, the ranks
agree through the engine in two rounds (`DiTGroup.stop`):

1. hold: each rank promises not to start a step after its next boundary, and answers that boundary
   (`StepControl.hold`: its step now, plus one if a step is under way). A rank that got there
   waits, so the answers are an upper bound of where any rank can be;
2. stop_at: the engine sends the largest answer to every rank; each runs on to that step (a rank
   that paused earlier runs the one step its neighbours are in, whose collectives then complete)
   and stops there.

Ranks run within one step of each other (each step's collectives couple them), so a stop costs at
most one step more than stopping at once. A hold that arrives before the run began (the dispatch
and the request raced) holds at the run's first step; one that arrives after the run ended answers
its last step, where the run already stands. A run is identified by (job id, run id): a control call
for an older run of the job is stale and ignored.

Pure threading, no Ray and no torch: the run thread and the control thread share one `StepControl`.
"""

from __future__ import annotations

import threading

__all__ = ["HOLD_TIMEOUT_S", "StepControl", "StepControls"]

HOLD_TIMEOUT_S = 120.0
"""A held run waits at most this long for its stop step; then it fails (the engine that held it is gone)."""


class StepControl:
    """The stop state of one run of one job on one rank, shared by its run thread and its control thread."""

    def __init__(self, run_id: int, step: int) -> None:
        self.run_id = run_id
        self._cond = threading.Condition()
        self._step = step  # steps done
        self._in_step = False
        self._held = False
        self._stop_at: int | None = None

    # ---- the run thread -------------------------------------------------------------------------

    def proceed(self, timeout_s: float = HOLD_TIMEOUT_S) -> bool:
        """At a step boundary: may the next step start? Waits while held without a stop step yet."""
        with self._cond:
            if self._held and self._stop_at is None:
                if not self._cond.wait_for(lambda: self._stop_at is not None, timeout_s):
                    raise TimeoutError(f"run {self.run_id} was held at step {self._step} and got no stop step "
                                       f"within {timeout_s:g} s")
            if self._stop_at is not None and self._step >= self._stop_at:
                return False
            self._in_step = True
            return True

    def stepped(self) -> None:
        """The step that `proceed` allowed is done."""
        with self._cond:
            self._step += 1
            self._in_step = False

    def ended(self) -> None:
        """The run left its loop (finished, stopped or failed): it stands where it is."""
        with self._cond:
            self._in_step = False

    # ---- the control thread ---------------------------------------------------------------------

    def hold(self) -> int:
        """Start no step after the next boundary; returns that boundary (steps done once it is reached)."""
        with self._cond:
            self._held = True
            return self._step + (1 if self._in_step else 0)

    def stop_at(self, step: int) -> None:
        """Stop once `step` steps are done (the first stop step decided stays: every rank got the same one)."""
        with self._cond:
            if self._stop_at is None:
                self._stop_at = step
            self._cond.notify_all()


class StepControls:
    """A rank's `StepControl`s, one per job (its latest run), created by whichever side comes first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._controls: dict[str, StepControl] = {}

    def get(self, job_id: str, run_id: int, step: int) -> StepControl | None:
        """The control of run `run_id` of the job, created at `step` (the job's steps done) if it is new;
        None for a stale run id (the job has started a later run since)."""
        with self._lock:
            control = self._controls.get(job_id)
            if control is None or control.run_id < run_id:
                control = self._controls[job_id] = StepControl(run_id, step)
            return control if control.run_id == run_id else None

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._controls.pop(job_id, None)
