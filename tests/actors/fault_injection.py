"""Rank actors that fail on purpose, for the fault tests: the real DiT / VAE ranks with one fault injected.

A DiT job whose prompt contains OOM_MARK makes rank FAULTY_RANK raise torch.OutOfMemoryError at
denoising step FAULT_STEP, just before its forward (the other ranks are then inside that step's
forward, waiting in its collective); HANG_MARK makes that rank sleep there instead (a hang with
no error); LATE_OOM_MARK makes it raise right after that step's forward (its collectives done, so
the other ranks finish the chunk and meet it at the chunk-end check). A VAE decode whose output
path contains OOM_MARK makes rank FAULTY_RANK raise before its strip decode (the others then wait
in the halo exchange). Every other job runs normally, so a rebuilt group serves the next job.
The test modules register this module to be pickled by value, so Ray workers need not import it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from actors.dit_group import DiTRankActor
from actors.vae_group import VAERankActor

FAULTY_RANK = 1
FAULT_STEP = 1
OOM_MARK = "inject-oom"
HANG_MARK = "inject-hang"
LATE_OOM_MARK = "inject-late-oom"
OOM_MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB (injected)"


def _out_of_memory() -> BaseException:
    import torch

    return torch.OutOfMemoryError(OOM_MESSAGE)


class FaultyDiTRank(DiTRankActor):
    """A DiT rank whose step FAULT_STEP fails on rank FAULTY_RANK for jobs whose prompt asks for it."""

    def on_group_ready(self) -> dict[str, Any]:
        extra = super().on_group_ready()
        velocity = self._stage.velocity

        def faulty_velocity(job: Any, timestep: Any) -> Any:
            faulty = self.rank == FAULTY_RANK and job.step == FAULT_STEP
            if faulty and OOM_MARK in job.params.prompt:
                raise _out_of_memory()
            if faulty and HANG_MARK in job.params.prompt:
                time.sleep(3600)
            v = velocity(job, timestep)
            if faulty and LATE_OOM_MARK in job.params.prompt:
                raise _out_of_memory()
            return v

        self._stage.velocity = faulty_velocity  # type: ignore[method-assign]
        return extra


class FaultyVAERank(VAERankActor):
    """A VAE rank whose decode fails on rank FAULTY_RANK when the output path asks for it."""

    def decode(self, latents: np.ndarray, out_path: str, fps: int,
               record: dict[str, Any]) -> dict[str, Any] | None:
        if self.rank == FAULTY_RANK and OOM_MARK in out_path:
            raise _out_of_memory()
        return super().decode(latents, out_path, fps, record)
