"""PAB: the step schedule per attention kind and the reuse of the stored output per layer and kind. Through
the real pipelines (Wan: self- and cross-attention; FLUX: joint attention): test_every_kind_in_the_pipelines.py."""

from __future__ import annotations

import torch

from flexcache.hooks import StepInfo
from flexcache.pab import PyramidAttentionBroadcast
from models.attention import AttentionMeta


def test_the_schedule_recomputes_every_range_steps_inside_the_window() -> None:
    pab = PyramidAttentionBroadcast(self_range=2, cross_range=3, warmup=2, cooldown=2, num_steps=12)
    reused_self = [pab.reuses(s, "self") for s in range(12)]
    reused_cross = [pab.reuses(s, "cross") for s in range(12)]
    assert reused_self == [False, False, False, True, False, True, False, True, False, True, False, False]
    assert reused_cross == [False, False, False, True, True, False, True, True, False, True, False, False]
    assert [pab.reuses(s, "joint") for s in range(12)] == reused_self


def test_a_reused_call_returns_the_layers_stored_output() -> None:
    pab = PyramidAttentionBroadcast(self_range=2, cross_range=2, warmup=0, cooldown=0, num_steps=4)
    q = torch.zeros(1, 3, 2, 4)
    calls: list[tuple[int, int]] = []

    def attend(step: int, layer: int) -> torch.Tensor:
        def compute(q, k, v, meta):  # noqa: ANN001, ANN202
            calls.append((step, layer))
            return torch.full_like(q, float(10 * step + layer))
        return pab.attention(StepInfo(step, 0.0, 1, 2), AttentionMeta(layer=layer), compute, q, q, q)

    outs = {(s, layer): attend(s, layer) for s in range(4) for layer in range(2)}
    assert calls == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert float(outs[(1, 1)][0, 0, 0, 0]) == 1.0 and float(outs[(3, 0)][0, 0, 0, 0]) == 20.0
    assert (pab.stats.attention_computed, pab.stats.attention_reused) == (4, 4)
    assert pab.extra_bytes() == 2 * q.numel() * 4
