"""DBCache: cache-dit's rule on toy blocks (Fn residual against the last computed step's, warm-up, reuse
limits, the middle residual applied to the Fn output with the Bn blocks still computed). Through the real
pipelines: test_every_kind_in_the_pipelines.py; under context parallelism: test_context_parallel_flux.py."""

from __future__ import annotations

import pytest
import torch

from flexcache.dbcache import DualBlockCache
from flexcache.hooks import StepInfo

NUM_BLOCKS = 4  # block 0 adds the step's r, blocks 1 and 2 (the middle with F1 B1) add 1 each, block 3 doubles


def forward(cache: DualBlockCache, r: float, step: int, computed: list[int]) -> torch.Tensor:
    info = StepInfo(step, 1000.0 - step, 1, NUM_BLOCKS)
    img, txt = torch.ones(1, 2, 3), torch.zeros(1, 1, 3)
    ops = [lambda x: x + r, lambda x: x + 1, lambda x: x + 1, lambda x: 2 * x]
    for index in range(NUM_BLOCKS):
        def compute(x: torch.Tensor, t: torch.Tensor, index: int = index) -> tuple[torch.Tensor, torch.Tensor]:
            computed.append(index)
            return ops[index](x), t + 1
        img, txt = cache.block(info, index, torch.nn.Identity(), compute, img, txt)
    return img


def test_the_middle_is_reused_below_the_threshold_and_the_last_blocks_still_run() -> None:
    cache = DualBlockCache(first_blocks=1, last_blocks=1, threshold=0.1, warmup_steps=1)
    computed: list[int] = []
    rs = [1.0, 1.0, 1.05, 1.3, 1.32]
    outs = [forward(cache, r, step, computed) for step, r in enumerate(rs)]
    # step 0 warm-up; step 1: change 0 < 0.1 -> reuse; step 2: 0.05 against step 0's stored r (not step 1's,
    # which was reused) -> reuse; step 3: 0.3 -> compute (stores 1.3); step 4: 0.0154 -> reuse
    assert [c[0] for c in cache.changes] == pytest.approx([float("inf"), 0.0, 0.05, 0.3, 0.02 / 1.3], rel=1e-4)
    assert computed == [0, 1, 2, 3, 0, 3, 0, 3, 0, 1, 2, 3, 0, 3]
    for r, out in zip(rs, outs):  # reused or not: the middle adds 2 here, then block 3 doubles
        torch.testing.assert_close(out, torch.full_like(out, 2 * (1 + r + 2)))
    assert (cache.stats.forwards_computed, cache.stats.forwards_reused) == (2, 3)


@pytest.mark.parametrize(("limits", "reused"), [
    ({"max_cached_steps": 2}, [False, True, True, False, False, False]),
    ({"max_continuous_cached_steps": 2}, [False, True, True, False, True, True]),
])
def test_the_reuse_limits(limits: dict, reused: list[bool]) -> None:
    cache = DualBlockCache(first_blocks=1, last_blocks=0, threshold=0.5, warmup_steps=1, **limits)
    computed: list[int] = []
    for step in range(6):
        before = len(computed)
        forward(cache, 1.0, step, computed)
        assert (len(computed) - before == 1) == reused[step], f"step {step}"


def test_threshold_zero_and_no_middle_compute_everything() -> None:
    for cache in (DualBlockCache(1, 0, 0.0, 0), DualBlockCache(3, 1, 0.9, 0)):
        computed: list[int] = []
        for step in range(4):
            forward(cache, 1.0, step, computed)
        assert computed == list(range(NUM_BLOCKS)) * 4 and cache.stats.forwards_reused == 0
