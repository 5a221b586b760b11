"""Errors the actor layer raises to the engine, and the one test for "an actor process is gone".

The engine retries a job when a stage actor died (the pool or group is rebuilt between tries,
SchedulerConfig.max_attempts) and fails it on anything else, so this distinction is the
contract between the actor layer and the engine.
"""

from __future__ import annotations

from ray.exceptions import RayActorError, WorkerCrashedError


class StageActorDied(RuntimeError):
    """An actor of a stage died during (or before) a call; the job may be retried.

    stage: "text_encode", "denoise" or "decode" (the pool's name); detail: which actor and why.
    """

    def __init__(self, stage: str, detail: str, rebuilt: bool = False) -> None:
        self.stage = stage
        self.detail = detail
        self.rebuilt = rebuilt
        state = "has been rebuilt" if rebuilt else "is being rebuilt"
        super().__init__(f"{stage} stage: {detail}; the {stage} pool {state}, so the job can be retried")

    def __reduce__(self) -> tuple:  # keep the attributes when the error crosses a process boundary
        return (type(self), (self.stage, self.detail, self.rebuilt))


class StageStartError(RuntimeError):
    """A pool or DiT group could not start: resources missing, or an actor failed while loading."""

    def __init__(self, stage: str, detail: str) -> None:
        self.stage = stage
        self.detail = detail
        super().__init__(f"{stage} stage failed to start: {detail}")

    def __reduce__(self) -> tuple:
        return (type(self), (self.stage, self.detail))


def is_actor_death(exc: BaseException | None) -> bool:
    """Whether `exc` means the actor's process is gone (killed, crashed, node lost), not a Python error.

    RayActorError covers ActorDiedError and ActorUnavailableError; the actors run with
    max_restarts=0, so an unavailable actor does not come back. WorkerCrashedError is what a
    task sees when its worker process exits mid-call.
    """
    return isinstance(exc, (RayActorError, WorkerCrashedError))


def first_line(exc: BaseException | None) -> str:
    """The headline of an error (Ray's death messages run to many lines of context)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def error_headline(exc: BaseException) -> str:
    """"<type>: <first line>" of the error a stage actor raised, without the remote traceback Ray wraps
    around it: what users see (job errors, HTTP messages); the full traceback goes to the log."""
    cause = getattr(exc, "cause", None)  # a RayTaskError carries the exception the actor raised
    error = cause if isinstance(cause, BaseException) else exc
    return f"{type(error).__name__}: {first_line(error)}"
