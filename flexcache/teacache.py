"""TeaCache (ali-vilab's reference rule), on any family that names its timestep-modulated input.

Per step and branch: m = the model's signal for the mode (`cache_signal`: Wan's timestep embedding e or
its modulation e0, FLUX's first-block modulated image tokens); delta = mean|m - m_prev| / mean|m_prev|;
acc += P(delta), P the mode's polynomial; while acc < threshold the step skips every block and the image
tokens become their input plus the stack's residual stored at the last computed step; otherwise the
stack runs, its residual is stored and acc = 0. m_prev follows every step. Forced steps compute and reset
acc: mode "default" the first and the last step, "ret_steps" the first five (the last is not forced).

Threshold 0 computes every step (some published polynomials go negative for small changes, which would
otherwise skip at 0). Under CFG each branch (batch row) has its own acc and m_prev; the batch skips only
when every branch would, and a branch computed early resets its acc. A token-level signal under context
parallelism is summed over every rank's real tokens (`StepInfo.reduce`, `real_tokens`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from flexcache.hooks import StepInfo
from flexcache.stack_residual import StackResidualCache
from flexcache.strategy import relative_change, tensor_bytes
from models.denoiser import CacheSignal

FORCED_FIRST_STEPS = {"default": 1, "ret_steps": 5}
FORCED_LAST_STEP = {"default": True, "ret_steps": False}


class TeaCache(StackResidualCache):
    """TeaCache over `num_steps` steps with `coefficients` (highest order first) on the model's `signal`."""

    def __init__(self, threshold: float, coefficients: tuple[float, ...], signal: str, num_steps: int,
                 mode: str = "default") -> None:
        super().__init__()
        if mode not in FORCED_FIRST_STEPS:
            raise ValueError(f"TeaCache mode must be one of {', '.join(FORCED_FIRST_STEPS)}, got {mode!r}")
        self.threshold, self.signal, self.num_steps, self.mode = threshold, signal, num_steps, mode
        self.rescale = np.poly1d(coefficients)
        self.trace: list[dict[str, object]] = []  # per forward: step, each branch's delta and acc, the decision
        self.reset()

    def reset(self) -> None:
        super().reset()
        self._prev: torch.Tensor | None = None
        self._acc: list[float] = []

    def extra_bytes(self) -> int:
        return super().extra_bytes() + tensor_bytes(self._prev)

    def _forced(self, step: int) -> bool:
        return step < FORCED_FIRST_STEPS[self.mode] or (FORCED_LAST_STEP[self.mode] and step == self.num_steps - 1)

    def begin(self, info: StepInfo, signal: Callable[[str], CacheSignal]) -> None:
        current = signal(self.signal)
        values = info.real(current.values) if current.per_token else current.values
        values = values.float()
        prev, branches = self._prev, values.shape[0]
        comparable = prev is not None and prev.shape == values.shape and len(self._acc) == branches
        compute = (not comparable or self.threshold == 0 or self._forced(info.step)
                   or not self.can_reuse(info))
        deltas = [float("nan")] * branches
        if comparable:
            deltas = relative_change(info, prev, values, reduce=current.per_token)  # type: ignore[arg-type]
        acc = self._acc if comparable else [0.0] * branches
        acc = [a + float(self.rescale(d)) for a, d in zip(acc, deltas)] if comparable and not compute else acc
        self.skipping = not compute and all(a < self.threshold for a in acc)
        self._acc = acc if self.skipping else [0.0] * branches
        self._prev = values
        self.trace.append({"step": info.step, "delta": deltas, "acc": list(acc), "reused": self.skipping})
