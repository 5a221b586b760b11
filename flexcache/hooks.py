"""The hook points of a denoiser forward, as the block-loop runner (stages/runner.py) calls them.

A feature cache is a `ForwardHooks` subclass: the runner consults it around the whole forward of a step,
around each block and around each attention call, on every path (single rank, CFG parallel, Ulysses /
Ring / hybrid). Under context parallelism the hooks run on every rank on that rank's shard of the tokens;
`StepInfo.reduce` sums a small tensor over the ranks that share the forward, so a decision taken from
token statistics is the same on every rank (and the same as on one rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from models.attention import AttentionFn, AttentionMeta
from models.denoiser import CacheSignal

Streams = tuple[torch.Tensor, "torch.Tensor | None"]


def _local(values: torch.Tensor) -> torch.Tensor:
    return values


@dataclass(frozen=True)
class StepInfo:
    """What a hook knows about the forward it is in.

    step: the step index (-1 outside a sampler loop); timestep: 1000 * sigma; branches: how many branches
    (CFG: 2, conditional first) the batch holds on this rank; num_blocks: the model's blocks, all kinds;
    reduce: sums a tensor over the ranks sharing this forward's tokens (identity on one rank);
    real_tokens: how many leading image-token rows of this rank's shard are real (the rest pad the shard to
    the common length and must not enter token statistics); None: all; latents: the forward's input
    (B, C, ...), whole on every rank (what a step-level cache on the model's input/output compares).
    """

    step: int
    timestep: float
    branches: int
    num_blocks: int = 0
    reduce: Callable[[torch.Tensor], torch.Tensor] = field(default=_local, compare=False, repr=False)
    real_tokens: int | None = None
    latents: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def real(self, img: torch.Tensor) -> torch.Tensor:
        """The real (unpadded) image-token rows of `img` (B, N, ...)."""
        return img if self.real_tokens is None else img[:, :self.real_tokens]


class ForwardHooks:
    """The hook points of a forward; the defaults compute everything. Subclass and override.

    step(info, compute) -> velocity: around one whole forward (a step-level cache may return a stored
    velocity instead of calling compute); begin(info, signal): once the embeddings exist; block(info, index, block, compute, img, txt) -> (img, txt):
    around one block; attention(info, meta, compute, q, k, v) -> out: around one attention call.
    """

    def step(self, info: StepInfo, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return compute()

    def begin(self, info: StepInfo, signal: Callable[[str], CacheSignal]) -> None:
        """After the model's embeddings, before the first block; `signal(name)` is the model's named
        per-step signal (`BlockDenoiser.cache_signal`) on this rank's tokens."""

    def block(self, info: StepInfo, index: int, block: nn.Module, compute: Callable[..., Streams],
              img: torch.Tensor, txt: torch.Tensor | None) -> Streams:
        return compute(img, txt)

    def attention(self, info: StepInfo, meta: AttentionMeta, compute: AttentionFn, q: torch.Tensor,
                  k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return compute(q, k, v, meta)


NO_HOOKS = ForwardHooks()
