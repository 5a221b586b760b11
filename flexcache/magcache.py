"""MagCache (Zehong-Ma/MagCache's reference rule): skip steps by a calibrated curve of residual magnitudes.

The stack's residual (image tokens after the last block minus before the first) changes its norm between
consecutive steps by a ratio gamma_t that hardly depends on the prompt and falls slowly over the steps, so
one calibration per model gives the curve (`ratios`, one per branch, conditional first). Per branch, from
the forward the reference counts as `retention_ratio` of all forwards on (the earlier ones always compute):
    acc_ratio *= gamma_t; acc_steps += 1; acc_err += |1 - acc_ratio|
and the branch may reuse the stored residual while acc_err < threshold and acc_steps <= max_skip_steps;
otherwise it computes and the three restart (1, 0, 0). As in the reference, forwards are counted per
branch call (CFG: conditional then unconditional each step), the curves are resampled to the request's
step count by nearest point, and a skipped forward keeps the stored residual. The batch runs as one, so it
skips only when every branch may; a computed forward restarts every branch.

The decision reads no tensor, so every context-parallel rank takes it alike without communicating.
Threshold 0 computes every step. (The FLUX reference rounds the retention boundary instead of truncating it
and never skips its step 11 of 28; this port applies the Wan rule to every family.)
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from flexcache.hooks import StepInfo
from flexcache.stack_residual import StackResidualCache
from models.denoiser import CacheSignal


def nearest_resample(curve: Sequence[float], length: int) -> list[float]:
    """`curve` at `length` evenly spaced points by nearest index (the reference's interpolation)."""
    values = np.asarray(curve, dtype=np.float64)
    if length == 1:
        return [float(values[-1])]
    scale = (len(values) - 1) / (length - 1)
    return values[np.round(np.arange(length) * scale).astype(int)].tolist()


class MagCache(StackResidualCache):
    """MagCache with error budget `threshold`, at most `max_skip_steps` reused in a row, over `num_steps`."""

    def __init__(self, threshold: float, max_skip_steps: int, retention_ratio: float,
                 ratios: Sequence[Sequence[float]], num_steps: int) -> None:
        super().__init__()
        if not ratios or any(len(curve) < 1 for curve in ratios):
            raise ValueError("MagCache needs at least one non-empty ratio curve")
        self.threshold, self.max_skip_steps = threshold, max_skip_steps
        self.retention_ratio, self.num_steps = retention_ratio, num_steps
        self.curves = [nearest_resample(curve, num_steps) if len(curve) != num_steps else [float(v) for v in curve]
                       for curve in ratios]
        self.trace: list[dict[str, object]] = []  # per forward: step, each branch's error and run, the decision
        self.reset()

    def reset(self) -> None:
        super().reset()
        self._ratio: list[float] = []
        self._steps: list[int] = []
        self._err: list[float] = []

    def _restart(self, branches: int) -> None:
        self._ratio, self._steps, self._err = [1.0] * branches, [0] * branches, [0.0] * branches

    def begin(self, info: StepInfo, signal: Callable[[str], CacheSignal]) -> None:
        branches = info.branches
        if len(self._ratio) != branches:
            self._restart(branches)
        retained = int(branches * self.num_steps * self.retention_ratio)
        wants = []
        for b in range(branches):
            if branches * info.step + b < retained or not 0 <= info.step < self.num_steps:
                wants.append(False)
                continue
            self._ratio[b] *= self.curves[min(b, len(self.curves) - 1)][info.step]
            self._steps[b] += 1
            self._err[b] += abs(1.0 - self._ratio[b])
            wants.append(self._err[b] < self.threshold and self._steps[b] <= self.max_skip_steps)
        self.skipping = all(wants) and self.can_reuse(info)
        self.trace.append({"step": info.step, "err": list(self._err), "run": list(self._steps),
                           "reused": self.skipping})
        if not self.skipping:
            self._restart(branches)
