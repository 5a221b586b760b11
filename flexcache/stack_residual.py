"""The whole-stack skip that step-level caches on the block stack share (TeaCache, MagCache).

A subclass decides once per forward, in `begin` (after the embeddings, before the first block), by
setting `self.skipping`. A skipped forward runs no block: the image tokens become their input plus the
stack's residual stored at the last computed forward (the head still runs on them, so the output keeps
the step's timestep modulation). A computed forward stores that residual when its last block is done.
The residual is this rank's shard under context parallelism, so every rank skips with its own.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from flexcache.hooks import StepInfo, Streams
from flexcache.strategy import CacheStrategy, tensor_bytes


class StackResidualCache(CacheStrategy):
    """Skips every block of a forward when `skipping` is set, reusing the stored stack residual."""

    def __init__(self) -> None:
        super().__init__()
        self.skipping = False
        self.residual: torch.Tensor | None = None
        self._input: torch.Tensor | None = None

    def reset(self) -> None:
        self.skipping = False
        self.residual = None
        self._input = None

    def extra_bytes(self) -> int:
        return tensor_bytes(self.residual)

    def can_reuse(self, info: StepInfo) -> bool:
        """Whether a stored residual fits this forward (same batch and shard shape is checked at use)."""
        return self.residual is not None and self.residual.shape[0] == info.branches

    def block(self, info: StepInfo, index: int, block: nn.Module, compute: Callable[..., Streams],
              img: torch.Tensor, txt: torch.Tensor | None) -> Streams:
        if self.skipping:
            self.stats.blocks_reused += 1
            if index == 0:
                self.stats.forwards_reused += 1
                self._account_memory()
                return img + self.residual, txt
            return img, txt
        if index == 0:
            self.stats.forwards_computed += 1
            self._input = img
        out_img, out_txt = compute(img, txt)
        self.stats.blocks_computed += 1
        if index == info.num_blocks - 1:
            self.residual = out_img - self._input
            self._input = None
            self._account_memory()
        return out_img, out_txt
