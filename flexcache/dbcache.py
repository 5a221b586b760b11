"""DBCache (cache-dit's dual block cache), on any family's block list.

Every step runs the first `first_blocks` blocks (Fn) and the last `last_blocks` (Bn); the middle ones are
the candidates. The indicator is the Fn residual, the image tokens after Fn minus the stack's input. A step
reuses the middle blocks (the image tokens, and a joint model's text tokens, become the Fn output plus the
middle blocks' residual from the last computed step) when all of these hold:
- the warm-up does not force it to compute (below; without an interval: it is past `warmup_steps`);
- fewer than `max_cached_steps` steps were reused so far, and fewer than
  `max_continuous_cached_steps` in a row (None: no limit);
- the Fn residual changed by less than `threshold` against the one stored at the last computed step,
  measured as mean|r - r_prev| / mean|r_prev|.
Only a computed step stores its Fn residual and the middle residual. When Fn and Bn leave no middle block,
every block is computed.

Warm-up interval I (cache-dit's `warmup_interval`): the warm-up forces only the steps 0, I, 2I, ... below
`warmup_steps` to compute (cache-dit's `range(0, max_warmup_steps, warmup_interval)`); the other warm-up
steps take the normal decision above. I = 1 forces every warm-up step.

TaylorSeer calibrator (cache-dit's TaylorSeerCalibratorConfig, order `taylorseer_order`; None: off): each
computed step also feeds the middle residual, of the image stream and of a joint model's text stream, to a
`TaylorForecaster`; a reused step applies its Taylor forecast at k = steps since the last computed step
instead of the stored residual. Like cache-dit (`current_step > 1`), the finite differences are taken only
from step 2 on, the steps before store the value alone. (cache-dit's calibrator counts steps from its first
update, one behind on a context's very first inference, which moves that to step 3 there; we follow its
steady state.) The decision itself still compares the computed Fn residuals, as in cache-dit.

Per-branch state and context parallelism work as in FBCache: each branch decides on its own change and
the batch reuses only when every branch may; the sums run over every rank's real tokens (`StepInfo.reduce`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from flexcache.hooks import StepInfo, Streams
from flexcache.strategy import CacheStrategy, relative_change, tensor_bytes
from flexcache.taylor import TaylorForecaster

CALIBRATOR_DIFFERENCES_FROM = 2  # cache-dit's calibrator takes finite differences from this step on


class DualBlockCache(CacheStrategy):
    """DBCache with Fn / Bn compute blocks, a warm-up (forcing every `warmup_interval`-th step), reuse limits,
    a threshold (0: all computed) and an optional TaylorSeer calibrator of order `taylorseer_order`."""

    def __init__(self, first_blocks: int, last_blocks: int, threshold: float, warmup_steps: int,
                 max_cached_steps: int | None = None, max_continuous_cached_steps: int | None = None,
                 warmup_interval: int = 1, taylorseer_order: int | None = None) -> None:
        super().__init__()
        if first_blocks < 1 or last_blocks < 0:
            raise ValueError(f"DBCache needs first_blocks >= 1 and last_blocks >= 0, got {first_blocks}, "
                             f"{last_blocks}")
        if warmup_interval < 1 or (taylorseer_order is not None and taylorseer_order < 0):
            raise ValueError(f"DBCache needs warmup_interval >= 1 and taylorseer_order >= 0, got {warmup_interval}, "
                             f"{taylorseer_order}")
        self.first_blocks, self.last_blocks, self.threshold = first_blocks, last_blocks, threshold
        self.warmup_steps, self.warmup_interval = warmup_steps, warmup_interval
        self.taylorseer_order = taylorseer_order
        self.max_cached_steps, self.max_continuous = max_cached_steps, max_continuous_cached_steps
        self.changes: list[list[float]] = []  # per forward: each branch's relative Fn-residual change
        self.reset()

    def reset(self) -> None:
        self._prev_fn: torch.Tensor | None = None
        self._residual: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._input: torch.Tensor | None = None
        self._middle_input: Streams | None = None
        self._cached = 0
        self._continuous = 0
        self._skipping = False
        order = self.taylorseer_order
        self._calibrators = None if order is None else (TaylorForecaster(order), TaylorForecaster(order))

    def extra_bytes(self) -> int:
        if self._calibrators is not None:  # their order-0 terms are the stored residual
            return tensor_bytes(self._prev_fn) + sum(c.extra_bytes() for c in self._calibrators)
        return tensor_bytes(self._prev_fn, *(self._residual or ()))

    def forced(self, step: int) -> bool:
        """Whether the warm-up forces `step` to compute: 0, I, 2I, ... below `warmup_steps` (and any step outside
        a sampler loop)."""
        return step < 0 or step in range(0, self.warmup_steps, self.warmup_interval)

    def _middle_residual(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a reused step adds to the Fn output: the stored middle residual, or its Taylor forecast."""
        if self._calibrators is None:
            return self._residual  # type: ignore[return-value]
        img_calibrator, txt_calibrator = self._calibrators
        res_txt = self._residual[1]  # type: ignore[index]
        return img_calibrator.forecast(step), (txt_calibrator.forecast(step) if res_txt is not None else None)

    def _store_middle_residual(self, step: int, res_img: torch.Tensor, res_txt: torch.Tensor | None) -> None:
        self._residual = (res_img, res_txt)
        if self._calibrators is not None:
            img_calibrator, txt_calibrator = self._calibrators
            differences = step >= CALIBRATOR_DIFFERENCES_FROM
            img_calibrator.update(res_img, step, differences)
            if res_txt is not None:
                txt_calibrator.update(res_txt, step, differences)
        self._account_memory()

    def _middle(self, info: StepInfo) -> range:
        return range(self.first_blocks, info.num_blocks - self.last_blocks)

    def block(self, info: StepInfo, index: int, block: nn.Module, compute: Callable[..., Streams],
              img: torch.Tensor, txt: torch.Tensor | None) -> Streams:
        middle = self._middle(info)
        if index == 0:
            self._input, self._skipping = img, False
        if index in middle and self._skipping:
            self.stats.blocks_reused += 1
            if index == middle.start:
                res_img, res_txt = self._middle_residual(info.step)
                return img + res_img, (txt + res_txt if txt is not None and res_txt is not None else txt)
            return img, txt
        out_img, out_txt = compute(img, txt)
        self.stats.blocks_computed += 1
        if len(middle) == 0:
            if index == info.num_blocks - 1:
                self.stats.forwards_computed += 1
            return out_img, out_txt
        if index == middle.start - 1:
            self._decide(info, out_img - self._input)
            self._middle_input = (out_img, out_txt)
        elif index == middle.stop - 1:
            first_img, first_txt = self._middle_input  # type: ignore[misc]
            self._store_middle_residual(info.step, out_img - first_img,
                                        out_txt - first_txt if out_txt is not None and first_txt is not None else None)
        return out_img, out_txt

    def _decide(self, info: StepInfo, fn_residual: torch.Tensor) -> None:
        prev = self._prev_fn
        usable = (prev is not None and prev.shape == fn_residual.shape and self._residual is not None
                  and self._residual[0].shape == fn_residual.shape)
        change = relative_change(info, info.real(prev), info.real(fn_residual)) if usable \
            else [float("inf")] * fn_residual.shape[0]
        self.changes.append(change)
        allowed = (not self.forced(info.step) and self.threshold > 0
                   and (self.max_cached_steps is None or self._cached < self.max_cached_steps)
                   and (self.max_continuous is None or self._continuous < self.max_continuous))
        self._skipping = usable and allowed and all(c < self.threshold for c in change)
        if self._skipping:
            self._cached += 1
            self._continuous += 1
            self.stats.forwards_reused += 1
        else:
            self._continuous = 0
            self._prev_fn = fn_residual
            self.stats.forwards_computed += 1
