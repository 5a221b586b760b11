"""Pyramid Attention Broadcast (PAB), in the step-window form of ChituDiffusion's port, through the attention seam.

Attention outputs change little in the middle of denoising, cross-attention least. Between `warmup` leading
and `cooldown` trailing steps, the attention call of each layer and kind recomputes when
(step - warmup) mod range == 0 (range: `self_range` for self- and joint attention, `cross_range` for
cross-attention) and otherwise returns the output it stored at its last computed step. Outside the window
every call computes. The schedule depends on the step only, so every rank of a context-parallel group skips
the same calls (and with them the same collectives); each rank stores its own shard's outputs. Under CFG the
stored output holds every branch's rows. Ranges of 1 compute everything, bit for bit.
"""

from __future__ import annotations

import torch

from flexcache.hooks import StepInfo
from flexcache.strategy import CacheStrategy, tensor_bytes
from models.attention import AttentionFn, AttentionMeta


class PyramidAttentionBroadcast(CacheStrategy):
    """PAB over `num_steps` steps."""

    def __init__(self, self_range: int, cross_range: int, warmup: int, cooldown: int, num_steps: int) -> None:
        super().__init__()
        if self_range < 1 or cross_range < 1:
            raise ValueError(f"PAB ranges must be >= 1, got self {self_range} and cross {cross_range}")
        self.ranges = {"self": self_range, "joint": self_range, "cross": cross_range}
        self.warmup, self.cooldown, self.num_steps = warmup, cooldown, num_steps
        self.decisions: dict[int, dict[str, bool]] = {}  # step -> kind -> reused (for tests and traces)
        self.reset()

    def reset(self) -> None:
        self._outputs: dict[tuple[int, str], torch.Tensor] = {}

    def extra_bytes(self) -> int:
        return tensor_bytes(*self._outputs.values())

    def reuses(self, step: int, kind: str) -> bool:
        """Whether the schedule reuses `kind` attention at `step` (given a stored output)."""
        if step < self.warmup or step >= self.num_steps - self.cooldown:
            return False
        return (step - self.warmup) % self.ranges[kind] != 0

    def attention(self, info: StepInfo, meta: AttentionMeta, compute: AttentionFn, q: torch.Tensor,
                  k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        key = (meta.layer, meta.kind)
        stored = self._outputs.get(key)
        if self.reuses(info.step, meta.kind) and stored is not None and stored.shape[:2] == q.shape[:2]:
            self.stats.attention_reused += 1
            self.decisions.setdefault(info.step, {})[meta.kind] = True
            return stored
        out = compute(q, k, v, meta)
        self.stats.attention_computed += 1
        self.decisions.setdefault(info.step, {})[meta.kind] = False
        self._outputs[key] = out
        self._account_memory()
        return out
