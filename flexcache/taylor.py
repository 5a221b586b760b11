"""The Taylor forecaster of TaylorSeer, for one tensor stream; TaylorSeer and DBCache's calibrator share it.

At each computed step s the stream's value F(s) is stored with its finite differences up to `max_order`:
  D0 = F(s),  D(i+1) = (Di(s) - Di(s_prev)) / (s - s_prev)
where s_prev is the previous computed step and Di(s_prev) the stored term of the same order; the ladder stops
at the first order whose previous term is missing (so it grows by one order per computed step). A caller may
store the value alone (`differences=False`): the references do so for their first steps, and a stored value
of another shape starts the ladder over. At a later step s + k the forecast is the truncated Taylor series
  F(s + k) ~ sum_i Di * k^i / i!,
with k counted in steps. This is the original's `derivative_approximation` / `taylor_formula` (and
cache-dit's TaylorSeerState), term for term in the same floating-point order; order 0 returns the stored
value itself.
"""

from __future__ import annotations

import math

import torch

from flexcache.strategy import tensor_bytes


class TaylorForecaster:
    """The value of one stream at its last computed step and its finite differences up to `max_order`."""

    def __init__(self, max_order: int) -> None:
        if max_order < 0:
            raise ValueError(f"the Taylor order must be >= 0, got {max_order}")
        self.max_order = max_order
        self.reset()

    def reset(self) -> None:
        self.terms: list[torch.Tensor] = []  # D0, D1, ...: the value and its divided differences
        self.step: int | None = None  # the computed step the terms belong to

    def ready(self, like: torch.Tensor) -> bool:
        """Whether a forecast exists for a stream shaped like `like`."""
        return bool(self.terms) and self.terms[0].shape == like.shape

    def update(self, value: torch.Tensor, step: int, differences: bool = True) -> None:
        """Store the stream's value computed at `step`; with `differences`, extend the ladder from the previous
        computed step's terms (none: the value alone)."""
        terms = [value]
        previous, distance = self.terms, (step - self.step if self.step is not None else 0)
        if differences and distance > 0 and previous and previous[0].shape == value.shape:
            for order in range(min(self.max_order, len(previous))):
                terms.append((terms[order] - previous[order]) / distance)
        self.terms, self.step = terms, step

    def forecast(self, step: int) -> torch.Tensor:
        """F(step) by the Taylor series around the last computed step."""
        if not self.terms or self.step is None:
            raise RuntimeError("nothing stored to forecast from")
        elapsed = step - self.step
        out = self.terms[0]
        for order in range(1, len(self.terms)):
            out = out + (1 / math.factorial(order)) * self.terms[order] * (elapsed ** order)
        return out

    def extra_bytes(self) -> int:
        return tensor_bytes(*self.terms)
