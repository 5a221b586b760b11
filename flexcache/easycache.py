"""EasyCache (H-EmbodVis's reference rule): runtime-adaptive, no calibration, on the model's input and output.

The cache is the whole forward's output minus its input (velocity minus latents, per branch). From the two
most recent computed steps it keeps k = mean|out - out_prev| / mean|in - in_prev|, the output's sensitivity
to its input. On a step that is not forced it predicts the relative output change k * mean|in - in_last| /
mean|out_last| (in_last: the previous step's input; out_last: the last computed output) and accumulates it;
while the sum stays below `threshold` the step returns its input plus the cached difference, else it
computes and the sum restarts. The first `ret_steps` steps and the last one are forced; so is every step
until k is known (two computed steps after a start or a reset).

As in the reference, the conditional branch (batch row 0) decides for the batch; each branch keeps its own
cached difference. The latents are whole on every rank, so every rank of a context-parallel group takes the
same decision without communicating; under CFG parallel each half decides on its own branch.
"""

from __future__ import annotations

from typing import Callable

import torch

from flexcache.hooks import StepInfo
from flexcache.strategy import CacheStrategy, tensor_bytes


def _mean_abs(x: torch.Tensor) -> float:
    return float(x.abs().mean(dtype=torch.float64))


class EasyCache(CacheStrategy):
    """EasyCache with `threshold` over `num_steps` steps, the first `ret_steps` of them always computed."""

    def __init__(self, threshold: float, ret_steps: int, num_steps: int) -> None:
        super().__init__()
        self.threshold, self.ret_steps, self.num_steps = threshold, ret_steps, num_steps
        self.trace: list[dict[str, object]] = []  # per forward: step, predicted change, sum, decision
        self.reset()

    def reset(self) -> None:
        self._in_last: torch.Tensor | None = None  # the previous step's input (every step)
        self._in_computed: torch.Tensor | None = None  # the input of the last computed step
        self._out_computed: torch.Tensor | None = None  # its output
        self._k: float | None = None
        self._acc = 0.0

    def extra_bytes(self) -> int:
        return tensor_bytes(self._in_last, self._in_computed, self._out_computed)

    def step(self, info: StepInfo, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        x = info.latents
        if x is None:
            raise ValueError("EasyCache needs the forward's latents (StepInfo.latents)")
        x = x.float()
        forced = info.step < self.ret_steps or info.step >= self.num_steps - 1
        reuse, predicted = False, float("nan")
        comparable = (self._k is not None and self._in_last is not None and self._out_computed is not None
                      and self._in_last.shape == x.shape)
        if forced or not comparable:
            self._acc = 0.0
        else:
            predicted = self._k * _mean_abs(x[0] - self._in_last[0]) / max(_mean_abs(self._out_computed[0]), 1e-30)
            self._acc += predicted
            reuse = self._acc < self.threshold
            if not reuse:
                self._acc = 0.0
        self._in_last = x
        self.trace.append({"step": info.step, "predicted": predicted, "acc": self._acc, "reused": reuse})
        if reuse:
            self.stats.forwards_reused += 1
            self.stats.blocks_reused += info.num_blocks
            return x + (self._out_computed - self._in_computed)
        out = compute().float()
        self.stats.forwards_computed += 1
        self.stats.blocks_computed += info.num_blocks
        if self._out_computed is not None and self._in_computed is not None and self._in_computed.shape == x.shape:
            input_change = _mean_abs(x[0] - self._in_computed[0])
            self._k = _mean_abs(out[0] - self._out_computed[0]) / input_change if input_change > 0 else None
        self._in_computed, self._out_computed = x, out
        self._account_memory()
        return out
