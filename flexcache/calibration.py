"""What the calibration tool measures during full compute, and the fits it makes from it.

`CalibrationRecorder` is a cache that never skips: around every forward it records, per branch (batch row),
the relative change of each named model signal since the previous forward (TeaCache's indicators), the
relative change of the forward's output (what TeaCache's polynomial predicts) and the ratio of the block
stack's residual norms between consecutive forwards (MagCache's gamma: per token ||r_t|| / ||r_t-1||,
averaged over the real tokens of every rank). A reset (Wan2.2's expert switch) starts the history afresh,
as the caches do.

The fits: TeaCache's polynomial by least squares on (indicator change, output change) over every recorded
forward, with R²; MagCache's curve as the mean ratio per step and branch over the prompts, with the R² of
that curve against each prompt's ratios (near 1: the ratios hardly depend on the prompt, the property MagCache
relies on). The reference calibrations pad step 0, which has no previous residual, with 1.0; so does this one.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from flexcache.hooks import StepInfo, Streams
from flexcache.strategy import CacheStrategy, relative_change
from models.denoiser import CacheSignal

logger = logging.getLogger(__name__)


@dataclass
class ForwardRecord:
    """One forward: its step, and per branch the indicator changes, the output change and MagCache's ratio
    (nan where there is no previous forward to compare with)."""

    step: int
    signal_change: dict[str, list[float]] = field(default_factory=dict)
    output_change: list[float] = field(default_factory=list)
    residual_ratio: list[float] = field(default_factory=list)


class CalibrationRecorder(CacheStrategy):
    """Computes everything and records a `ForwardRecord` per forward for the model signals `signals`."""

    def __init__(self, signals: Sequence[str]) -> None:
        super().__init__()
        self.signals = tuple(dict.fromkeys(signals))
        self.records: list[ForwardRecord] = []
        self.reset()

    def reset(self) -> None:
        self._prev_signal: dict[str, torch.Tensor] = {}
        self._prev_output: torch.Tensor | None = None
        self._prev_norms: torch.Tensor | None = None
        self._input: torch.Tensor | None = None

    def step(self, info: StepInfo, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        record = ForwardRecord(info.step)
        self.records.append(record)
        out = compute()
        current = out.float()
        prev = self._prev_output
        record.output_change = (relative_change(info, prev, current, reduce=False)
                                if prev is not None and prev.shape == current.shape else [math.nan] * info.branches)
        self._prev_output = current
        self.stats.forwards_computed += 1
        return out

    def begin(self, info: StepInfo, signal: Callable[[str], CacheSignal]) -> None:
        record = self.records[-1]
        for name in self.signals:
            current = signal(name)
            values = (info.real(current.values) if current.per_token else current.values).float()
            prev = self._prev_signal.get(name)
            record.signal_change[name] = (relative_change(info, prev, values, reduce=current.per_token)
                                          if prev is not None and prev.shape == values.shape
                                          else [math.nan] * info.branches)
            self._prev_signal[name] = values

    def block(self, info: StepInfo, index: int, block: nn.Module, compute: Callable[..., Streams],
              img: torch.Tensor, txt: torch.Tensor | None) -> Streams:
        if index == 0:
            self._input = img
        out_img, out_txt = compute(img, txt)
        self.stats.blocks_computed += 1
        if index == info.num_blocks - 1:
            norms = info.real(out_img - self._input).float().norm(dim=-1)  # (B, tokens)
            prev, record = self._prev_norms, self.records[-1]
            if prev is not None and prev.shape == norms.shape:
                sums = torch.stack([(norms / prev).sum(1, dtype=torch.float64),
                                    torch.full((norms.shape[0],), norms.shape[1], dtype=torch.float64)])
                total, count = info.reduce(sums)
                record.residual_ratio = (total / count).tolist()
            else:
                record.residual_ratio = [math.nan] * norms.shape[0]
            self._prev_norms, self._input = norms, None
        return out_img, out_txt


def r_squared(observed: np.ndarray, predicted: np.ndarray) -> float:
    """1 - residual sum of squares / total sum of squares (1: a perfect fit; nan without spread)."""
    total = float(np.sum((observed - observed.mean()) ** 2))
    return 1.0 - float(np.sum((observed - predicted) ** 2)) / total if total > 0 else math.nan


def fit_polynomial(x: Sequence[float], y: Sequence[float], degree: int = 4) -> tuple[tuple[float, ...], float, int]:
    """TeaCache's rescaling: the least-squares polynomial y ~ P(x) (highest order first), its R², the samples."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    if len(xs) <= degree:
        raise ValueError(f"a degree-{degree} fit needs more than {degree} samples, got {len(xs)}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coefficients = np.polyfit(xs, ys, degree)
    if caught:
        logger.warning("the degree-%d fit over %d samples is poorly conditioned (%s); more prompts or steps help",
                       degree, len(xs), caught[0].message)
    return tuple(float(c) for c in coefficients), r_squared(ys, np.polyval(coefficients, xs)), int(len(xs))


def teacache_samples(runs: Sequence[Sequence[ForwardRecord]], signal: str) -> tuple[list[float], list[float]]:
    """Every (indicator change, output change) pair of the runs, all branches."""
    x, y = [], []
    for records in runs:
        for record in records:
            x.extend(record.signal_change.get(signal, []))
            y.extend(record.output_change)
    return x, y


def fit_ratio_curves(runs: Sequence[Sequence[ForwardRecord]], num_steps: int
                     ) -> tuple[tuple[tuple[float, ...], ...], float, int]:
    """MagCache's curves: per branch and step the mean ratio over the runs (1.0 where none was recorded),
    the R² of the curves against every run's ratios, and how many ratios they come from."""
    branches = max((len(r.residual_ratio) for records in runs for r in records), default=1)
    values: list[list[list[float]]] = [[[] for _ in range(num_steps)] for _ in range(branches)]
    for records in runs:
        for record in records:
            for b, ratio in enumerate(record.residual_ratio):
                if 0 <= record.step < num_steps and math.isfinite(ratio):
                    values[b][record.step].append(ratio)
    curves = tuple(tuple(float(np.mean(v)) if v else 1.0 for v in per_step) for per_step in values)
    observed = np.array([r for b in range(branches) for per_step in values[b] for r in per_step])
    predicted = np.array([curves[b][s] for b in range(branches) for s in range(num_steps) for _ in values[b][s]])
    return curves, (r_squared(observed, predicted) if len(observed) else math.nan), int(len(observed))
