"""TaylorSeer: the reference's full-step schedule, the Taylor forecast of each block's residual (checked by hand
on polynomial residual traces) and the shared forecaster's difference ladder. Through the real pipelines:
test_every_kind_in_the_pipelines.py; under context parallelism: test_context_parallel_flux.py."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from flexcache.hooks import StepInfo
from flexcache.taylor import TaylorForecaster
from flexcache.taylorseer import TaylorSeer

F, T = False, True  # full step, forecast step

Residual = Callable[[int, int], float]  # (block, step) -> what the block adds at that step


def forward(cache: TaylorSeer, step: int, residual: Residual, computed: list[tuple[int, int]],
            num_blocks: int = 2, joint: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Toy blocks: block i adds residual(i, step) to the image stream and 10x that to the text stream."""
    info = StepInfo(step, 1000.0 - step, 1, num_blocks)
    img, txt = torch.ones(1, 2, 3, dtype=torch.float64), (torch.zeros(1, 1, 3, dtype=torch.float64) if joint else None)
    for index in range(num_blocks):
        def compute(x: torch.Tensor, t: torch.Tensor | None, index: int = index):  # noqa: ANN202
            computed.append((step, index))
            r = residual(index, step)
            return x + r, (t + 10 * r if t is not None else None)
        img, txt = cache.block(info, index, torch.nn.Identity(), compute, img, txt)
    return img, txt


def test_the_schedule_is_the_references_counter() -> None:
    # warm-up 2: steps 0, 1 full, then every 3rd step after the last warm-up one (4, 7)
    assert TaylorSeer(3, 1, 2, 10).schedule() == [F, F, T, T, F, T, T, F, T, T]
    # the defaults (N 5, first_enhance 1): 0, 5, 10; no final full step
    assert TaylorSeer(5, 1, 1, 12).schedule() == [F, T, T, T, T, F, T, T, T, T, F, T]
    # nothing stored at step 0 -> it computes even without a warm-up
    assert TaylorSeer(2, 1, 0, 5).schedule() == [F, T, F, T, F]
    assert TaylorSeer(1, 2, 1, 4).schedule() == [F, F, F, F]


def test_forecast_steps_skip_every_block_and_count() -> None:
    cache = TaylorSeer(interval=3, max_order=1, warmup_steps=2, num_steps=8)
    computed: list[tuple[int, int]] = []
    for step in range(8):
        forward(cache, step, lambda i, s: 1.0, computed)
    assert sorted({s for s, _ in computed}) == [0, 1, 4, 7]
    assert cache.decisions == {s: {0: r, 1: r} for s, r in enumerate(cache.schedule())}
    stats = cache.stats
    assert (stats.forwards_computed, stats.forwards_reused, stats.blocks_computed, stats.blocks_reused) == (4, 4, 8, 8)
    # per block: the image and text residual and one difference each, float64, 6 + 3 elements
    assert stats.peak_extra_bytes == cache.extra_bytes() == 2 * 2 * (6 + 3) * 8


def test_a_residual_linear_in_the_step_is_forecast_exactly_at_order_1() -> None:
    cache = TaylorSeer(interval=3, max_order=1, warmup_steps=1, num_steps=6)
    residual: Residual = lambda i, s: (i + 1) * (0.5 + 2.0 * s)  # noqa: E731
    computed: list[tuple[int, int]] = []
    outs = [forward(cache, step, residual, computed) for step in range(6)]  # full at 0 and 3
    for step, (img, txt) in enumerate(outs):
        total = residual(0, step) + residual(1, step)
        # steps 1, 2 have one full step behind them: the value alone (order 0), i.e. step 0's residuals
        expected = residual(0, 0) + residual(1, 0) if step in (1, 2) else total
        torch.testing.assert_close(img, torch.full_like(img, 1 + expected), rtol=0, atol=1e-12)
        torch.testing.assert_close(txt, torch.full_like(txt, 10 * expected), rtol=0, atol=1e-12)


def test_order_2_is_the_hand_computed_taylor_series() -> None:
    cache = TaylorSeer(interval=3, max_order=2, warmup_steps=1, num_steps=8)
    computed: list[tuple[int, int]] = []
    outs = [forward(cache, step, lambda i, s: float(s * s), computed, num_blocks=1) for step in range(8)]
    # full at 0, 3, 6: D0 = 36, D1 = (36 - 9) / 3 = 9, D2 = (9 - (9 - 0) / 3) / 3 = 2
    # step 7: 36 + 9 * 1 + 2 * 1 / 2 = 46; step 5 (from step 3: D0 9, D1 3): 9 + 3 * 2 = 15
    assert float(outs[7][0][0, 0, 0]) == 1 + 46 and float(outs[5][0][0, 0, 0]) == 1 + 15


def test_the_warm_up_stores_values_only_before_its_last_step() -> None:
    # first_enhance 3: steps 0, 1 store the value only, so step 2's ladder is [F2, F2 - F1] (no second order)
    cache = TaylorSeer(interval=2, max_order=2, warmup_steps=3, num_steps=5)
    computed: list[tuple[int, int]] = []
    outs = [forward(cache, step, lambda i, s: float(s * s), computed, num_blocks=1) for step in range(4)]
    assert float(outs[3][0][0, 0, 0]) == 1 + 4 + (4 - 1)  # step 3 forecast from step 2: 4 + 3 * 1


def test_interval_1_is_bit_identical_to_no_cache() -> None:
    torch.manual_seed(0)
    weights = [torch.randn(3, 3) for _ in range(3)]

    def run(cache: TaylorSeer | None, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        info = StepInfo(step, 0.0, 2, 3)
        img, txt = torch.randn(2, 4, 3), torch.randn(2, 2, 3)
        for index, w in enumerate(weights):
            def compute(x: torch.Tensor, t: torch.Tensor, w: torch.Tensor = w):  # noqa: ANN202
                return torch.tanh(x @ w) * (1 + step), t @ w
            img, txt = cache.block(info, index, torch.nn.Identity(), compute, img, txt) if cache else compute(img, txt)
        return img, txt

    cache = TaylorSeer(interval=1, max_order=2, warmup_steps=0, num_steps=5)
    for step in range(5):
        torch.manual_seed(step)
        expected = run(None, step)
        torch.manual_seed(step)
        got = run(cache, step)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert cache.stats.blocks_reused == cache.stats.forwards_reused == 0


def test_reset_forgets_and_the_next_step_is_full() -> None:
    cache = TaylorSeer(interval=4, max_order=1, warmup_steps=1, num_steps=8)
    computed: list[tuple[int, int]] = []
    for step in range(3):
        forward(cache, step, lambda i, s: float(s), computed)
    cache.reset()  # e.g. Wan2.2's expert switch
    assert cache.extra_bytes() == 0
    for step in range(3, 8):
        forward(cache, step, lambda i, s: float(s), computed)
    # full at 0, then (after the reset) at 3 and 3 + 4 = 7
    assert sorted({s for s, _ in computed}) == [0, 3, 7]


def test_the_forecaster_ladder() -> None:
    f = TaylorForecaster(max_order=2)
    assert not f.ready(torch.zeros(1))
    for step, value in [(0, 0.0), (2, 4.0), (4, 16.0)]:  # F(s) = s^2
        f.update(torch.tensor([value]), step)
    # D0 16, D1 (16 - 4) / 2 = 6, D2 (6 - 2) / 2 = 2: F(5) ~ 16 + 6 + 2 / 2 = 23
    assert [float(t) for t in f.terms] == [16.0, 6.0, 2.0]
    assert float(f.forecast(5)) == 23.0 and float(f.forecast(4)) == 16.0
    f.update(torch.tensor([1.0, 2.0]), 6)  # another shape: the ladder starts over
    assert len(f.terms) == 1 and f.ready(torch.zeros(2)) and not f.ready(torch.zeros(1))
    f.update(torch.tensor([3.0, 3.0]), 7, differences=False)
    assert len(f.terms) == 1
    with pytest.raises(RuntimeError):
        TaylorForecaster(1).forecast(0)
