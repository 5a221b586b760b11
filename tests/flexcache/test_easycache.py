"""EasyCache: the reference rule on a hand-made input/output trace (the sensitivity k from the last two
computed steps, the accumulated prediction, forced steps, the conditional branch deciding). Through the
real pipelines: test_every_kind_in_the_pipelines.py."""

from __future__ import annotations

import pytest
import torch

from flexcache.easycache import EasyCache
from flexcache.hooks import StepInfo


def run(cache: EasyCache, inputs: list[torch.Tensor], model) -> list[torch.Tensor]:  # noqa: ANN001
    """One forward per input through `model` (latents -> output), counting the calls."""
    outs = []
    for step, x in enumerate(inputs):
        info = StepInfo(step, 1000.0 - step, x.shape[0], 4, latents=x)
        outs.append(cache.step(info, lambda x=x: model(x)))
    return outs


def test_the_predicted_change_accumulates_and_reuses_input_plus_cached_difference() -> None:
    calls: list[int] = []

    def model(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return 3 * x + 1  # out - out' = 3 (in - in'): k = 3

    cache = EasyCache(threshold=0.5, ret_steps=2, num_steps=6)
    xs = [torch.full((1, 2, 3), v) for v in (1.0, 1.2, 1.25, 1.30, 1.6, 1.65)]
    outs = run(cache, xs, model)
    # steps 0, 1 forced (k = 3 after step 1, out_last = 4.6); step 2: predicted 3 * 0.05 / 4.6 = 0.0326,
    # reused; step 3: + 0.0326 = 0.065, reused; step 4: + 3 * 0.3 / 4.6 = 0.196 -> 0.261, reused; step 5 forced
    reused = [t["reused"] for t in cache.trace]
    assert reused == [False, False, True, True, True, False] and len(calls) == 3
    assert cache.trace[2]["predicted"] == pytest.approx(3 * 0.05 / 4.6, rel=1e-6)
    assert cache.trace[4]["acc"] == pytest.approx(3 * (0.05 + 0.05 + 0.3) / 4.6, rel=1e-6)
    # a reused step returns its input plus the last computed output-minus-input (step 1: 4.6 - 1.2 = 3.4)
    torch.testing.assert_close(outs[3], xs[3] + 3.4)
    assert cache.stats.forwards_reused == 3 and cache.stats.blocks_reused == 12


def test_the_sum_restarts_when_it_reaches_the_threshold() -> None:
    cache = EasyCache(threshold=0.05, ret_steps=2, num_steps=6)
    xs = [torch.full((1, 4), v) for v in (1.0, 1.2, 1.25, 1.30, 1.35, 1.4)]
    run(cache, xs, lambda x: 3 * x + 1)
    # predictions 0.0326 each: step 2 reused (0.0326), step 3 computed (0.065 >= 0.05, restart), step 4 reused
    assert [t["reused"] for t in cache.trace] == [False, False, True, False, True, False]


def test_the_conditional_branch_decides() -> None:
    cache = EasyCache(threshold=0.5, ret_steps=2, num_steps=5)
    # the unconditional row changes a lot, the conditional one little: the batch is reused anyway
    xs = [torch.stack([torch.full((3,), c), torch.full((3,), u)]) for c, u in
          ((1.0, 1.0), (1.2, 2.0), (1.25, 9.0), (1.3, 20.0), (1.35, 30.0))]
    outs = run(cache, xs, lambda x: 3 * x + 1)
    assert [t["reused"] for t in cache.trace][:4] == [False, False, True, True]
    torch.testing.assert_close(outs[2][1], xs[2][1] + (3 * 2.0 + 1 - 2.0))  # each row its own difference
