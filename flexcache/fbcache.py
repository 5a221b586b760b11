"""First-block cache (FBCache, as ParaAttention implements it), on any family's block list.

Every step runs the first block; r1 = its output minus its input (image tokens). When the previous
step's r1 exists and mean|r1 - r1_prev| / mean|r1_prev| < threshold, the remaining blocks are skipped:
the image tokens become the first block's input plus the residual of the whole stack stored at the
last fully computed step. Otherwise the stack runs and that residual is stored. r1_prev is updated on
every step, computed or not. The text stream of a joint model (FLUX) is not carried further than the
head needs: the head reads the image tokens only.

Under CFG each branch (batch row) has its own r1 history and decides on its own change; the batch skips
only when every branch may. Under context parallelism the two means are sums over every rank's tokens
(`StepInfo.reduce`), so all ranks take the same decision, the one a single rank would take.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from flexcache.hooks import StepInfo, Streams
from flexcache.strategy import CacheStrategy, relative_change, tensor_bytes


class FirstBlockCache(CacheStrategy):
    """FBCache with one threshold (0: every block runs, bit-identical to no cache)."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self.changes: list[list[float]] = []  # per forward, each branch's relative r1 change (inf: none)
        self.reset()

    def reset(self) -> None:
        self._prev_r1: torch.Tensor | None = None
        self._residual: torch.Tensor | None = None
        self._input: torch.Tensor | None = None
        self._skipping = False

    def extra_bytes(self) -> int:
        return tensor_bytes(self._prev_r1, self._residual)

    def block(self, info: StepInfo, index: int, block: nn.Module, compute: Callable[..., Streams],
              img: torch.Tensor, txt: torch.Tensor | None) -> Streams:
        last = info.num_blocks - 1
        if index == 0:
            return self._first_block(info, compute, img, txt, last)
        if self._skipping:
            self.stats.blocks_reused += 1
            return img, txt
        out_img, out_txt = compute(img, txt)
        self.stats.blocks_computed += 1
        if index == last:
            self._residual = out_img - self._input
            self._account_memory()
        return out_img, out_txt

    def _first_block(self, info: StepInfo, compute: Callable[..., Streams], img: torch.Tensor,
                     txt: torch.Tensor | None, last: int) -> Streams:
        out_img, out_txt = compute(img, txt)
        self.stats.blocks_computed += 1
        r1 = out_img - img
        prev = self._prev_r1
        usable = prev is not None and prev.shape == r1.shape and self._residual is not None \
            and self._residual.shape == img.shape
        change = relative_change(info, info.real(prev), info.real(r1)) if usable \
            else [float("inf")] * r1.shape[0]
        self.changes.append(change)
        self._prev_r1 = r1
        self._skipping = usable and all(c < self.threshold for c in change)
        if self._skipping:
            self.stats.forwards_reused += 1
            self._account_memory()
            return img + self._residual, out_txt
        self.stats.forwards_computed += 1
        self._input = img
        if last == 0:
            self._residual = r1
        return out_img, out_txt
