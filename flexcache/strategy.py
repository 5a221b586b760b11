"""What every feature cache shares: per-request state, the counts of work computed and reused, and
the factory from the request's `cache` spec.

A strategy object belongs to one request (the denoise job carries it between step chunks, on every
rank). Under CFG its state is per branch: the batch rows are the branches, and each row keeps its own
history. The runner computes a batch as a whole, so the batch reuses cached work only when every
branch's rule allows it (a branch computed early simply refreshes its history). `reset()` drops the
state; the denoise stage calls it when the expert changes (Wan2.2), because the other expert's
activations are not comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from flexcache.hooks import ForwardHooks, StepInfo
from flexcache.spec import CacheSpec


@dataclass
class CacheStats:
    """Work done and skipped over one request: forwards (steps x experts' calls), blocks and attention calls
    (counted by the strategies that decide at that level)."""

    forwards_computed: int = 0
    forwards_reused: int = 0
    blocks_computed: int = 0
    blocks_reused: int = 0
    attention_computed: int = 0
    attention_reused: int = 0
    peak_extra_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class CacheStrategy(ForwardHooks):
    """A feature cache: `ForwardHooks` that may skip work, with its own state and `stats`."""

    def __init__(self) -> None:
        self.stats = CacheStats()

    def reset(self) -> None:
        """Forget every cached tensor (new expert, or a fresh start); the stats keep counting."""

    def extra_bytes(self) -> int:
        """Memory the cached tensors hold now."""
        return 0

    def _account_memory(self) -> None:
        self.stats.peak_extra_bytes = max(self.stats.peak_extra_bytes, self.extra_bytes())


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def relative_change(info: StepInfo, prev: torch.Tensor, cur: torch.Tensor, reduce: bool = True) -> list[float]:
    """Per branch (batch row) mean|cur - prev| / mean|prev|; with `reduce` the sums run over every rank's
    tokens (`StepInfo.reduce`), so each rank measures what one rank would."""
    dims = tuple(range(1, cur.dim()))
    sums = torch.stack([(cur - prev).abs().sum(dims, dtype=torch.float64),
                        prev.abs().sum(dims, dtype=torch.float64)])
    num, den = info.reduce(sums) if reduce else sums
    return [float(n / d) if d > 0 else float("inf") for n, d in zip(num.tolist(), den.tolist())]


def make_strategy(spec: CacheSpec | None, num_steps: int,
                  teacache_signals: Mapping[str, str] | None = None,
                  sigmas: Sequence[float] | None = None) -> CacheStrategy | None:
    """The strategy a request's (resolved) `cache` spec names, for a job of `num_steps` steps; None: no cache.

    teacache_signals: the model's TeaCache mode -> `cache_signal` name (`ModelDescription.teacache`);
    sigmas: the sampler's noise levels (num_steps + 1, a final 0), for the caches that extrapolate along them.
    """
    if spec is None:
        return None
    if spec.kind == "fbcache":
        from flexcache.fbcache import FirstBlockCache

        return FirstBlockCache(spec.threshold)
    if spec.kind == "dbcache":
        from flexcache.dbcache import DualBlockCache

        return DualBlockCache(spec.first_blocks, spec.last_blocks, spec.threshold, spec.warmup_steps,
                              spec.max_cached_steps, spec.max_continuous_cached_steps, spec.warmup_interval,
                              spec.taylorseer_order if spec.taylorseer else None)
    if spec.kind == "teacache":
        from flexcache.teacache import TeaCache

        signal = (teacache_signals or {}).get(spec.mode)
        if signal is None or spec.coefficients is None:
            raise ValueError(f"TeaCache mode {spec.mode!r} needs the model's signal for it and coefficients "
                             f"(resolve the request against the model's description)")
        return TeaCache(spec.threshold, spec.coefficients, signal, num_steps, spec.mode)
    if spec.kind == "magcache":
        from flexcache.magcache import MagCache

        if spec.ratios is None:
            raise ValueError("MagCache needs residual-norm ratios (resolve the request against the model's "
                             "description, or give them)")
        return MagCache(spec.threshold, spec.max_skip_steps, spec.retention_ratio, spec.ratios, num_steps)
    if spec.kind == "easycache":
        from flexcache.easycache import EasyCache

        return EasyCache(spec.threshold, spec.ret_steps, num_steps)
    if spec.kind == "pab":
        from flexcache.pab import PyramidAttentionBroadcast

        return PyramidAttentionBroadcast(spec.self_range, spec.cross_range, spec.warmup, spec.cooldown, num_steps)
    if spec.kind == "meancache":
        from flexcache.meancache import MeanCache

        if sigmas is None or len(sigmas) != num_steps + 1:
            raise ValueError("MeanCache needs the sampler's num_steps + 1 sigmas")
        return MeanCache(spec.fresh_steps, spec.use_jvp, [float(s) for s in sigmas])
    if spec.kind == "blockdance":
        from flexcache.blockdance import BlockDance

        return BlockDance(spec.boundary_block, spec.group_size, spec.start_fraction, spec.end_fraction,
                          spec.warmup, spec.cooldown, num_steps)
    if spec.kind == "taylorseer":
        from flexcache.taylorseer import TaylorSeer

        return TaylorSeer(spec.interval, spec.max_order, spec.warmup_steps, num_steps)
    raise ValueError(f"unknown cache kind {spec.kind!r}")
