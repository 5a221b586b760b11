"""TaylorSeer (Shenyi-Z/TaylorSeer, ChituDiffusion's port): forecast features between full steps instead of
reusing them, at block granularity.

Schedule (the reference's `cal_type`, with `warmup_steps` as its `first_enhance` and `interval` as its
`fresh_threshold` N): a counter starts at 0; a step is full when step < warmup_steps or the counter is N - 1
(the counter then returns to 0), otherwise it is a forecast step and the counter grows by one. So the full
steps are 0 .. W-1 and then every N-th step after the last warm-up one (W-1+N, W-1+2N, ...); no final step
is forced (the reference forces none). A step with nothing stored (the first, or the first after `reset()`,
e.g. at Wan2.2's expert switch) is full as well and restarts the counter, so warmup_steps 0 acts as 1.

Forecast: on a full step every block runs and each block's residual (output minus input; for FLUX's blocks
both the image and the text stream) enters that block's `TaylorForecaster`, with its finite differences
divided by the distance between full steps; like the reference (`step > first_enhance - 2`), steps before
W - 1 store the value only. On a forecast step the block is skipped and returns input + the Taylor forecast
of its residual at k = steps since the last full step. `interval` 1 computes everything, bit for bit.

Deviation: the original forecasts each module's output inside a block (attention, MLP; Wan: self-, cross-
attention and FFN), then applies the block's gates and norms to the forecasts. Our hook points surround whole
blocks and attention calls, so a block's total residual is forecast instead: the same number of forecast
streams per block (one per token stream instead of two or three), the same schedule and Taylor rule, with the
gates folded into the forecast quantity.

The forecast is elementwise, so per-branch rows under CFG need no per-branch state. The schedule depends on
the step only, so every context-parallel rank skips the same blocks (and their collectives) without a
collective; each rank forecasts its own shard. A block whose stored residual does not match its input's
shape computes (and stores) even on a forecast step.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from flexcache.hooks import StepInfo, Streams
from flexcache.strategy import CacheStrategy
from flexcache.taylor import TaylorForecaster


class TaylorSeer(CacheStrategy):
    """TaylorSeer over `num_steps` steps: full every `interval` steps after `warmup_steps`, Taylor forecasts of
    each block's residual to `max_order` between them."""

    def __init__(self, interval: int, max_order: int, warmup_steps: int, num_steps: int) -> None:
        super().__init__()
        if interval < 1 or max_order < 0 or warmup_steps < 0:
            raise ValueError(f"TaylorSeer needs interval >= 1, max_order >= 0 and warmup_steps >= 0, got "
                             f"{interval}, {max_order}, {warmup_steps}")
        self.interval, self.max_order, self.warmup_steps = interval, max_order, warmup_steps
        self.num_steps = num_steps
        self.decisions: dict[int, dict[int, bool]] = {}  # step -> block index -> forecast (for tests and traces)
        self.reset()

    def reset(self) -> None:
        self._forecasters: dict[tuple[int, str], TaylorForecaster] = {}  # (block, "img" / "txt")
        self._counter = 0
        self._last_full: int | None = None
        self._step: int | None = None
        self._forecasting = False

    def extra_bytes(self) -> int:
        return sum(f.extra_bytes() for f in self._forecasters.values())

    def schedule(self) -> list[bool]:
        """Whether each of the `num_steps` steps forecasts, for an uninterrupted run (no `reset()`)."""
        probe = TaylorSeer(self.interval, self.max_order, self.warmup_steps, self.num_steps)
        return [probe._decide(step) for step in range(self.num_steps)]

    def _decide(self, step: int) -> bool:
        """The reference's rule for a new step: True to forecast; a full step restarts the counter."""
        if step >= self.warmup_steps and self._last_full is not None and self._counter != self.interval - 1:
            self._counter += 1
            return True
        self._counter, self._last_full = 0, step
        return False

    def _begin_forward(self, info: StepInfo) -> None:
        if info.step < 0:  # outside a sampler loop: compute, store nothing
            self._forecasting = False
        elif info.step != self._step:
            self._step, self._forecasting = info.step, self._decide(info.step)
        if self._forecasting:
            self.stats.forwards_reused += 1
        else:
            self.stats.forwards_computed += 1

    def _forecaster(self, index: int, stream: str) -> TaylorForecaster:
        key = (index, stream)
        if key not in self._forecasters:
            self._forecasters[key] = TaylorForecaster(self.max_order)
        return self._forecasters[key]

    def block(self, info: StepInfo, index: int, block: nn.Module, compute: Callable[..., Streams],
              img: torch.Tensor, txt: torch.Tensor | None) -> Streams:
        if index == 0:
            self._begin_forward(info)
        img_f = self._forecaster(index, "img")
        txt_f = self._forecaster(index, "txt") if txt is not None else None
        forecast = self._forecasting and img_f.ready(img) and (txt_f is None or txt_f.ready(txt))
        if info.step >= 0:
            self.decisions.setdefault(info.step, {})[index] = forecast
        if forecast:
            self.stats.blocks_reused += 1
            return (img + img_f.forecast(info.step),
                    txt + txt_f.forecast(info.step) if txt_f is not None else txt)  # type: ignore[operator]
        out_img, out_txt = compute(img, txt)
        self.stats.blocks_computed += 1
        if info.step >= 0:
            differences = info.step > self.warmup_steps - 2
            img_f.update(out_img - img, info.step, differences)
            if txt_f is not None and out_txt is not None:
                txt_f.update(out_txt - txt, info.step, differences)
            self._account_memory()
        return out_img, out_txt
