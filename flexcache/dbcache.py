"""DBCache (cache-dit's dual block cache), on any family's block list.

Every step runs the first `first_blocks` blocks (Fn) and the last `last_blocks` (Bn); the middle ones are
the candidates. The indicator is the Fn residual, the image tokens after Fn minus the stack's input. A step
reuses the middle blocks (the image tokens, and a joint model's text tokens, become the Fn output plus the
middle blocks' residual from the last computed step) when all of these hold:
- it is past the `warmup_steps` warm-up;
- fewer than `max_cached_steps` steps were reused so far, and fewer than
  `max_continuous_cached_steps` in a row (None: no limit);
- the Fn residual changed by less than `threshold` against the one stored at the last computed step,
  measured as mean|r - r_prev| / mean|r_prev|.
Only a computed step stores its Fn residual and the middle residual. When Fn and Bn leave no middle block,
every block is computed.

Per-branch state and context parallelism work as in FBCache: each branch decides on its own change and
the batch reuses only when every branch may; the sums run over every rank's real tokens (`StepInfo.reduce`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from flexcache.hooks import StepInfo, Streams
from flexcache.strategy import CacheStrategy, relative_change, tensor_bytes


class DualBlockCache(CacheStrategy):
    """DBCache with Fn / Bn compute blocks, a warm-up, reuse limits and a threshold (0: all computed)."""

    def __init__(self, first_blocks: int, last_blocks: int, threshold: float, warmup_steps: int,
                 max_cached_steps: int | None = None, max_continuous_cached_steps: int | None = None) -> None:
        super().__init__()
        if first_blocks < 1 or last_blocks < 0:
            raise ValueError(f"DBCache needs first_blocks >= 1 and last_blocks >= 0, got {first_blocks}, "
                             f"{last_blocks}")
        self.first_blocks, self.last_blocks, self.threshold = first_blocks, last_blocks, threshold
        self.warmup_steps = warmup_steps
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

    def extra_bytes(self) -> int:
        return tensor_bytes(self._prev_fn, *(self._residual or ()))

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
                res_img, res_txt = self._residual  # type: ignore[misc]
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
            self._residual = (out_img - first_img,
                              out_txt - first_txt if out_txt is not None and first_txt is not None else None)
            self._account_memory()
        return out_img, out_txt

    def _decide(self, info: StepInfo, fn_residual: torch.Tensor) -> None:
        prev = self._prev_fn
        usable = (prev is not None and prev.shape == fn_residual.shape and self._residual is not None
                  and self._residual[0].shape == fn_residual.shape)
        change = relative_change(info, info.real(prev), info.real(fn_residual)) if usable \
            else [float("inf")] * fn_residual.shape[0]
        self.changes.append(change)
        allowed = (info.step >= self.warmup_steps and self.threshold > 0
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
