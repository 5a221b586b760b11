"""MeanCache (UnicomAI's rule, in the step-level form of ChituDiffusion's port), for flow-matching samplers.

A fixed schedule picks the fresh steps, the ones whose forward runs; every other step returns a velocity
extrapolated from the recent history instead of calling the model. The history holds, for each recent step
(fresh or reused), its input latents x_s and its velocity v_s, so the latents move along the sampler's own
trajectory (any sampler: the motion is read off the inputs, not recomputed). On a reuse step t whose
interval of the schedule has the JVP span k:

    j = the step k steps back (t - k; fewer when the history is shorter)
    u_avg = (x_t - x_j) / (sigma_t - sigma_j)          the average velocity over [j, t)
    jvp = (v_j - u_avg) / (sigma_t - sigma_j)           its finite-difference Jacobian-vector estimate
    v_t = v_{t-1} - jvp * (sigma_{t+1} - sigma_t)

(sigma falls, so both differences are negative.) With `use_jvp` off, v_t = v_{t-1}, the last fresh velocity.
A span of 1 on an Euler sampler gives jvp = 0, the plain reuse the reference calls "v_diff_mean".

The schedule: the published 50-step tables of fresh steps for the budgets 25, 17 and 10 (UnicomAI's, also
in ChituDiffusion) and 30 (ChituDiffusion's), each with its per-interval JVP span. Neither reference has a
rule for other step counts or budgets (ChituDiffusion falls back to the 25 table cut at the step count, which
can leave the last steps unrefreshed), so for those this module resamples the nearest table
(`fresh_schedule`): the same budget fraction of the steps, spread like the table, the first and the last
step always fresh. A budget at or above the step count computes every step, bit for bit.

Deviation from ChituDiffusion: its port keeps only the fresh steps in the history, so a span of k reaches k
fresh steps back (up to 26 steps for the 25 table) and v_{t-1} is always the last fresh velocity. The
original code, for which the tables and spans were tuned, keeps every step; this module follows it.

Under CFG each batch row (branch, conditional first) keeps its own velocities; the latents are shared. As the
guidance combination's weights sum to one and every step above is affine in the velocities, combining the
rows' extrapolations gives exactly the reference's extrapolation of the guided velocity. The decision is
schedule-based and the latents are whole on every rank, so context-parallel ranks agree without talking.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from flexcache.hooks import StepInfo
from flexcache.strategy import CacheStrategy, tensor_bytes

PUBLISHED_STEPS = 50
"""The step count the published tables are for."""

_CONSECUTIVE = tuple(range(20))  # fresh steps 0, 1, 2, ...

PUBLISHED_SCHEDULES: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    # budget -> (fresh steps of 50, the JVP span of each interval between consecutive fresh steps). A span of
    # 1 is the reference's "v_diff_mean" (and its "chain" between adjacent fresh steps), k > 1 "v_diff_mean_jvp1_sk".
    30: (_CONSECUTIVE + (24, 28, 32, 36, 40, 43, 45, 47, 48, 49), (1,) * 24 + (5, 5, 5, 1, 1)),
    25: (_CONSECUTIVE[:17] + (24, 32, 40, 43, 45, 47, 48, 49), (1,) * 19 + (5, 5, 5, 1, 1)),
    17: (_CONSECUTIVE[:9] + (10, 17, 24, 31, 38, 45, 48, 49), (1,) * 8 + (2,) + (1,) * 5 + (4, 1)),
    10: ((0, 1, 3, 7, 14, 21, 28, 35, 42, 49), (1, 2) + (1,) * 6 + (4,)),
}


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def fresh_schedule(num_steps: int, budget: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the fresh steps, the JVP span of each interval between them) for `budget` fresh steps of `num_steps`.

    A published table when there is one for (num_steps, budget); every step when budget >= num_steps;
    otherwise the published table whose budget fraction is nearest budget / num_steps (ties: the larger
    budget) resampled: fresh step j is the table's step at fractional index j (b - 1) / (budget - 1)
    (linear between table steps), scaled from 49 to num_steps - 1 and rounded half up, then pushed apart so
    the steps are distinct, 0 and num_steps - 1 included. An interval takes the span of the table interval
    holding its midpoint: 1 (plain reuse) stays 1, a JVP span k > 1 becomes k scaled the same way, rounded,
    at least 2 (a JVP over the same share of the run). At 50 steps this reproduces each table.
    """
    if num_steps < 1 or budget < 1:
        raise ValueError(f"MeanCache needs at least one step and a budget of at least 1, got {num_steps}, {budget}")
    if budget >= num_steps:
        return tuple(range(num_steps)), (1,) * (num_steps - 1)
    if num_steps == PUBLISHED_STEPS and budget in PUBLISHED_SCHEDULES:
        return PUBLISHED_SCHEDULES[budget]
    if budget == 1:
        raise ValueError("MeanCache needs a budget of at least 2 fresh steps (the first and the last)")
    nearest = min(PUBLISHED_SCHEDULES, key=lambda b: (abs(budget / num_steps - b / PUBLISHED_STEPS), -b))
    return resample_schedule(PUBLISHED_SCHEDULES[nearest], num_steps, budget)


def resample_schedule(schedule: tuple[tuple[int, ...], tuple[int, ...]], num_steps: int,
                      budget: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A published 50-step `schedule` (fresh steps, spans) resampled to `budget` of `num_steps` steps
    (2 <= budget < num_steps); the rule is `fresh_schedule`'s."""
    table, table_spans = schedule
    scale = (num_steps - 1) / (PUBLISHED_STEPS - 1)
    steps = []
    for j in range(budget):
        position = j * (len(table) - 1) / (budget - 1)
        low = min(int(position), len(table) - 2)
        table_step = table[low] + (position - low) * (table[low + 1] - table[low])
        steps.append(_round_half_up(table_step * scale))
    for j in range(1, budget):
        steps[j] = max(steps[j], steps[j - 1] + 1)
    steps[-1] = num_steps - 1
    for j in range(budget - 2, -1, -1):
        steps[j] = min(steps[j], steps[j + 1] - 1)
    spans = []
    for start, stop in zip(steps, steps[1:]):
        midpoint = (start + stop) / 2 / scale
        interval = max(i for i in range(len(table) - 1) if table[i] <= midpoint)
        span = table_spans[interval]
        spans.append(1 if span == 1 else max(2, _round_half_up(span * scale)))
    return tuple(steps), tuple(spans)


@dataclass(frozen=True)
class _StepRecord:
    step: int
    latents: torch.Tensor  # the step's input (B, C, ...) fp32
    velocity: torch.Tensor  # its velocity, computed or extrapolated, per row fp32


class MeanCache(CacheStrategy):
    """MeanCache with `fresh_steps` computed steps over the sampler's `sigmas` (num_steps + 1, a final 0)."""

    def __init__(self, fresh_steps: int, use_jvp: bool, sigmas: list[float]) -> None:
        super().__init__()
        self.num_steps = len(sigmas) - 1
        self.sigmas, self.use_jvp = list(sigmas), use_jvp
        self.fresh, self.spans = fresh_schedule(self.num_steps, fresh_steps)
        self._span_at = [0] * self.num_steps  # the JVP span of the interval each step lies in
        for start, stop, span in zip(self.fresh, self.fresh[1:], self.spans):
            self._span_at[start:stop] = [span] * (stop - start)
        self._fresh = frozenset(self.fresh)
        self._dtype: torch.dtype | None = None  # the computed velocity's dtype, given back on reuse
        self.decisions: dict[int, dict[str, bool]] = {}  # step -> {"reused": ...} (tests and traces)
        self.reset()

    def reset(self) -> None:
        self._history: deque[_StepRecord] = deque(maxlen=max(self.spans, default=1))

    def extra_bytes(self) -> int:
        return tensor_bytes(*(t for record in self._history for t in (record.latents, record.velocity)))

    def computes(self, step: int) -> bool:
        """Whether the schedule computes `step` (a step outside the sampler loop always computes)."""
        return step in self._fresh or not 0 <= step < self.num_steps

    def step(self, info: StepInfo, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if not 0 <= info.step < self.num_steps:
            return compute()
        if info.latents is None:
            raise ValueError("MeanCache needs the forward's latents (StepInfo.latents)")
        x = info.latents.detach().to(torch.float32, copy=True)
        predicted = None if self.computes(info.step) else self._extrapolate(info.step, x)
        self.decisions[info.step] = {"reused": predicted is not None}
        if predicted is not None:
            self.stats.forwards_reused += 1
            self.stats.blocks_reused += info.num_blocks
            self._record(info.step, x, predicted)
            return predicted.to(self._dtype or predicted.dtype)
        out = compute()
        self.stats.forwards_computed += 1
        self.stats.blocks_computed += info.num_blocks
        if out.shape != x.shape:
            raise ValueError(f"MeanCache needs a velocity of the latents' shape, got {tuple(out.shape)} for "
                             f"latents {tuple(x.shape)}")
        self._dtype = out.dtype
        self._record(info.step, x, out.detach().to(torch.float32, copy=True))
        return out

    def _record(self, step: int, latents: torch.Tensor, velocity: torch.Tensor) -> None:
        self._history.append(_StepRecord(step, latents, velocity))
        self._account_memory()

    def _extrapolate(self, step: int, x: torch.Tensor) -> torch.Tensor | None:
        """The velocity of reuse step `step` from the history; None (compute) without the previous step's."""
        history = self._history
        if not history or history[-1].step != step - 1 or history[-1].latents.shape != x.shape:
            return None
        last = history[-1].velocity
        if not self.use_jvp:
            return last
        span = min(self._span_at[step], len(history))
        while history[-span].step != step - span:  # only an unbroken run of steps counts
            span -= 1
        first = history[-span]
        sigma_start, sigma_end = self.sigmas[first.step], self.sigmas[step]
        if sigma_end == sigma_start:
            return last
        average = (x - first.latents) / (sigma_end - sigma_start)
        jvp = (first.velocity - average) / (sigma_end - sigma_start)
        return last - jvp * (self.sigmas[step + 1] - self.sigmas[step])
