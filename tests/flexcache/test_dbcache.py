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


@pytest.mark.parametrize(("interval", "reused"), [
    (1, [False] * 6 + [True, True]),
    (2, [False, True, False, True, False, True, True, True]),  # only 0, 2, 4 of the 6 warm-up steps forced
    (4, [False, True, True, True, False, True, True, True]),
])
def test_the_warm_up_interval_forces_every_interval_th_warm_up_step(interval: int, reused: list[bool]) -> None:
    cache = DualBlockCache(first_blocks=1, last_blocks=0, threshold=0.5, warmup_steps=6, warmup_interval=interval)
    computed: list[int] = []
    for step in range(8):
        before = len(computed)
        forward(cache, 1.0, step, computed)  # the Fn residual never changes: every free step reuses
        assert (len(computed) - before == 1) == reused[step], f"step {step}"
    assert [cache.forced(s) for s in range(8)] == [s < 6 and s % interval == 0 for s in range(8)]


def middle_forward(cache: DualBlockCache, step: int, computed: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """F1 B0 over 3 blocks: block 0 adds 1 (a constant Fn residual), the middle blocks 1 and 2 add 2 * step + 1
    each to the image stream and 10x that to the text: the middle residual is M(step) = 4 * step + 2."""
    info = StepInfo(step, 1000.0 - step, 1, 3)
    img, txt = torch.zeros(1, 2, 3, dtype=torch.float64), torch.zeros(1, 1, 3, dtype=torch.float64)
    for index in range(3):
        def compute(x: torch.Tensor, t: torch.Tensor, index: int = index) -> tuple[torch.Tensor, torch.Tensor]:
            computed.append(index)
            add = 1.0 if index == 0 else 2.0 * step + 1
            return x + add, t + 10 * add
        img, txt = cache.block(info, index, torch.nn.Identity(), compute, img, txt)
    return img, txt


@pytest.mark.parametrize("taylorseer_order", [None, 1])
def test_the_taylorseer_calibrator_forecasts_the_middle_residual(taylorseer_order: int | None) -> None:
    cache = DualBlockCache(first_blocks=1, last_blocks=0, threshold=0.5, warmup_steps=2,
                           max_continuous_cached_steps=1, taylorseer_order=taylorseer_order)
    computed: list[int] = []
    outs = [middle_forward(cache, step, computed) for step in range(7)]
    middle = {s: 4.0 * s + 2 for s in range(7)}  # M(s) as computed
    # steps 0, 1 warm-up, then reuse and compute alternate (at most one reused step in a row)
    if taylorseer_order is None:  # the residual stored at the last computed step
        applied = {2: middle[1], 4: middle[3], 6: middle[5]}
    else:
        # differences only from step 2 on: step 1 stores M1 alone, so step 2 gets M1; step 3 stores
        # D1 = (M3 - M1) / 2 = 4 and the forecast from then on is exact for this linear M
        applied = {2: middle[1], 4: middle[3] + 4 * 1, 6: middle[5] + 4 * 1}
    assert computed == [0, 1, 2] * 2 + [0, 0, 1, 2] * 2 + [0]
    for step, (img, txt) in enumerate(outs):  # the text stream's middle residual is forecast the same way
        expected = applied.get(step, middle[step])
        torch.testing.assert_close(img, torch.full_like(img, 1 + expected), rtol=0, atol=1e-12)
        torch.testing.assert_close(txt, torch.full_like(txt, 10 * (1 + expected)), rtol=0, atol=1e-12)
    if taylorseer_order is not None:  # Fn residual, and per stream D0 and D1 (image 6 and text 3 elements)
        assert cache.extra_bytes() == (6 + 2 * (6 + 3)) * 8


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_the_calibrator_changes_what_the_reused_steps_apply_in_the_pipelines(
        family: str, request: pytest.FixtureRequest, uncached) -> None:  # noqa: ANN001 - a fixture
    pipe, params, _ = uncached(family, request)
    spec = {"kind": "dbcache", "threshold": 0.9, "first_blocks": 1, "warmup_steps": 2,
            "max_continuous_cached_steps": 1}
    plain = pipe.generate(params | {"cache": spec})
    calibrated = pipe.generate(params | {"cache": spec | {"taylorseer": True}})
    assert plain.cache["forwards_reused"] > 0 and calibrated.cache["forwards_reused"] > 0
    # past the first computed steps the forecast adds a difference term to the stored residual
    assert not torch.equal(plain.latents, calibrated.latents)
    assert calibrated.cache["peak_extra_bytes"] > plain.cache["peak_extra_bytes"]
