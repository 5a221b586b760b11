"""MeanCache: the fresh-step schedules (published tables, the resampling rule), the extrapolated velocity on a
hand-made trace (average velocity, JVP estimate, chaining), per-branch state, off and reset. Through the real
pipelines: test_every_kind_in_the_pipelines.py."""

from __future__ import annotations

import pytest
import torch

from flexcache.hooks import StepInfo
from flexcache.meancache import PUBLISHED_SCHEDULES, MeanCache, fresh_schedule, resample_schedule


def linear_sigmas(num_steps: int) -> list[float]:
    return [1 - s / num_steps for s in range(num_steps + 1)]


def feed(cache: MeanCache, step: int, latents: torch.Tensor, velocity: torch.Tensor,
         calls: list[int] | None = None) -> torch.Tensor:
    """One forward at `step` whose model would return `velocity`."""
    def compute() -> torch.Tensor:
        if calls is not None:
            calls.append(step)
        return velocity
    return cache.step(StepInfo(step, 1000.0, latents.shape[0], 4, latents=latents), compute)


def computed_steps(num_steps: int, budget: int) -> list[int]:
    cache = MeanCache(budget, True, linear_sigmas(num_steps))
    return [s for s in range(num_steps) if cache.computes(s)]


def test_the_published_50_step_tables() -> None:
    assert computed_steps(50, 25) == list(range(17)) + [24, 32, 40, 43, 45, 47, 48, 49]
    assert computed_steps(50, 10) == [0, 1, 3, 7, 14, 21, 28, 35, 42, 49]
    assert computed_steps(50, 17) == list(range(9)) + [10, 17, 24, 31, 38, 45, 48, 49]
    assert computed_steps(50, 30) == list(range(20)) + [24, 28, 32, 36, 40, 43, 45, 47, 48, 49]
    # the JVP spans: 25's intervals 40->43, 43->45, 45->47 reach 5 steps back; 10's 1->3 two, 42->49 four
    assert fresh_schedule(50, 25)[1][19:22] == (5, 5, 5) and set(fresh_schedule(50, 25)[1][:19]) == {1}
    assert fresh_schedule(50, 10)[1] == (1, 2, 1, 1, 1, 1, 1, 1, 4)


def test_other_settings_resample_the_nearest_table() -> None:
    for budget, schedule in PUBLISHED_SCHEDULES.items():
        assert resample_schedule(schedule, 50, budget) == schedule  # the rule reproduces every table
    # 8 steps, budget 4 (fraction 0.5, the 25 table): its steps at table indices 0, 8, 16, 24 -> 0, 8, 16, 49,
    # scaled by 7 / 49 -> 0, 1.14, 2.29, 7
    assert computed_steps(8, 4) == [0, 1, 2, 7]
    assert computed_steps(3, 2) == [0, 2]  # fraction 0.67 -> the 30 table, first and last step
    # 20 steps, budget 10 (the 10 table at its own fraction): its 42 -> 49 JVP interval (span 4) scales to 2
    assert fresh_schedule(20, 10) == ((0, 1, 2, 3, 4, 5, 6, 14, 18, 19), (1,) * 7 + (2, 1))
    assert computed_steps(8, 8) == computed_steps(8, 30) == list(range(8))


def test_a_reuse_step_extrapolates_with_the_jvp_estimate() -> None:
    cache = MeanCache(10, True, linear_sigmas(50))  # fresh 0, 1, 3, ...: step 2 reuses with span 2
    calls: list[int] = []
    feed(cache, 0, torch.full((1, 3), 1.0), torch.full((1, 3), 2.0), calls)
    feed(cache, 1, torch.full((1, 3), 0.96), torch.full((1, 3), 3.0), calls)
    out = feed(cache, 2, torch.full((1, 3), 0.9), torch.full((1, 3), 99.0), calls)
    # u_avg = (0.9 - 1.0) / (0.96 - 1.0) = 2.5; jvp = (v_0 - u_avg) / -0.04 = (2 - 2.5) / -0.04 = 12.5;
    # v_2 = v_1 - jvp * (sigma_3 - sigma_2) = 3 - 12.5 * (-0.02) = 3.25
    assert calls == [0, 1]
    torch.testing.assert_close(out, torch.full((1, 3), 3.25))
    assert cache.decisions == {0: {"reused": False}, 1: {"reused": False}, 2: {"reused": True}}
    assert (cache.stats.forwards_computed, cache.stats.forwards_reused) == (2, 1)
    assert (cache.stats.blocks_computed, cache.stats.blocks_reused) == (8, 4)
    assert cache.stats.peak_extra_bytes == 3 * 2 * 3 * 4  # 3 steps of latents + velocities (span <= 4)


def test_a_span_of_one_on_an_euler_trajectory_reuses_the_last_velocity_chained() -> None:
    sigmas = linear_sigmas(50)
    cache = MeanCache(10, True, sigmas)  # interval 3 -> 7 has span 1
    x = torch.full((1, 2), 1.0)
    for step, v in enumerate([2.0, 3.0, None, 5.0, None, None]):
        out = feed(cache, step, x, torch.full((1, 2), v if v is not None else 99.0))
        if step >= 4:
            torch.testing.assert_close(out, torch.full((1, 2), 5.0))  # jvp = 0: v_3 carried on
        x = x + (sigmas[step + 1] - sigmas[step]) * out


def test_each_branch_keeps_its_own_velocities_and_the_guided_result_is_the_references() -> None:
    cache = MeanCache(10, True, linear_sigmas(50))
    xs = [torch.full((2, 3), x) for x in (1.0, 0.96, 0.9)]
    v0, v1 = torch.tensor([[2.0] * 3, [1.0] * 3]), torch.tensor([[3.0] * 3, [0.0] * 3])
    feed(cache, 0, xs[0], v0)
    feed(cache, 1, xs[1], v1)
    out = feed(cache, 2, xs[2], torch.zeros(2, 3))
    # row 1: jvp = (1 - 2.5) / -0.04 = 37.5; v_2 = 0 + 37.5 * 0.02 = 0.75
    torch.testing.assert_close(out, torch.tensor([[3.25] * 3, [0.75] * 3]))
    # combining the rows (v_u + g (v_c - v_u)) equals one row fed the guided velocities
    guided = MeanCache(10, True, linear_sigmas(50))
    combine = lambda v: v[1:] + 4.0 * (v[:1] - v[1:])  # noqa: E731
    feed(guided, 0, xs[0][:1], combine(v0))
    feed(guided, 1, xs[1][:1], combine(v1))
    torch.testing.assert_close(feed(guided, 2, xs[2][:1], torch.zeros(1, 3)), combine(out))


def test_without_jvp_a_reuse_step_returns_the_last_velocity() -> None:
    cache = MeanCache(10, False, linear_sigmas(50))
    feed(cache, 0, torch.full((1, 3), 1.0), torch.full((1, 3), 2.0))
    feed(cache, 1, torch.full((1, 3), 0.96), torch.full((1, 3), 3.0))
    torch.testing.assert_close(feed(cache, 2, torch.full((1, 3), 0.9), torch.zeros(1, 3)), torch.full((1, 3), 3.0))


def test_a_budget_of_every_step_computes_everything_bit_for_bit() -> None:
    cache = MeanCache(8, True, linear_sigmas(8))
    for step in range(8):
        velocity = torch.randn(2, 3)
        assert feed(cache, step, torch.randn(2, 3), velocity) is velocity
    assert cache.stats.forwards_reused == 0 and cache.stats.forwards_computed == 8


def test_reset_forgets_the_history_so_the_next_reuse_step_computes() -> None:
    cache = MeanCache(10, True, linear_sigmas(50))
    calls: list[int] = []
    feed(cache, 0, torch.ones(1, 3), torch.ones(1, 3), calls)
    feed(cache, 1, torch.ones(1, 3), torch.ones(1, 3), calls)
    cache.reset()
    assert cache.extra_bytes() == 0
    feed(cache, 2, torch.ones(1, 3), torch.ones(1, 3), calls)  # a reuse step of the schedule, no history
    assert calls == [0, 1, 2] and cache.decisions[2] == {"reused": False}


def test_latents_are_required() -> None:
    cache = MeanCache(10, True, linear_sigmas(50))
    with pytest.raises(ValueError, match="latents"):
        cache.step(StepInfo(0, 1000.0, 1, 4), lambda: torch.ones(1))
