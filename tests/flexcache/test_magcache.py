"""MagCache: the reference decision rule on hand-picked ratio curves (accumulated ratio and error, the run
limit, retention counted per branch call, per-branch curves), the curve resampling, and the published
curves filled in at resolution. Through the real pipelines: test_every_kind_in_the_pipelines.py."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from flexcache.hooks import StepInfo
from flexcache.magcache import MagCache, nearest_resample
from models.denoiser import CacheSignal
from models.wan.family import WAN_MAGCACHE_RATIOS
from models.wan.family import description as wan_description
from models.wan.config import PRESETS as WAN_PRESETS
from stages.params import GenerationParams


def run(cache: MagCache, steps: int, branches: int = 1, num_blocks: int = 2) -> list[torch.Tensor]:
    """One forward per step over toy blocks that each add the step number + 1 to the image tokens."""
    outs = []
    for step in range(steps):
        info = StepInfo(step, 1000.0 - step, branches, num_blocks)
        cache.begin(info, lambda name: CacheSignal(torch.zeros(branches, 1), per_token=False))
        img, txt = torch.zeros(branches, 3, 2), None
        for index in range(num_blocks):
            img, txt = cache.block(info, index, torch.nn.Identity(), lambda x, t, s=step: (x + s + 1, t), img, txt)
        outs.append(img)
    return outs


def test_the_accumulated_error_and_the_run_limit_decide() -> None:
    # ratio 0.9 every step: after one skip acc_ratio 0.9 (err 0.1), two: 0.81 (err 0.1 + 0.19 = 0.29).
    cache = MagCache(0.2, 3, 0.0, [[0.9] * 8], num_steps=8)
    run(cache, 8)
    # step 0 has no residual yet; 1: err 0.1 reuse; 2: err 0.29 compute (restart); 3: reuse; 4: compute ...
    assert [t["reused"] for t in cache.trace] == [False, True, False, True, False, True, False, True]
    assert [round(e, 6) for e in cache.trace[1]["err"]] == [0.1]
    assert (cache.stats.forwards_computed, cache.stats.forwards_reused) == (4, 4)
    limited = MagCache(10.0, 2, 0.0, [[1.0] * 8], num_steps=8)  # no error ever: the run limit K = 2 decides
    run(limited, 8)
    assert [t["reused"] for t in limited.trace] == [False, True, True, False, True, True, False, True]


def test_a_reused_step_adds_the_residual_of_the_last_computed_one() -> None:
    outs = run(MagCache(10.0, 1, 0.0, [[1.0] * 4], num_steps=4), 4)
    # computed steps 0 and 2 add 2 * (step + 1); reused steps 1 and 3 repeat the previous step's residual
    assert [float(o[0, 0, 0]) for o in outs] == [2.0, 2.0, 6.0, 6.0]


def test_retention_counts_branch_calls_as_the_reference() -> None:
    # 5 steps, 2 branches: 10 calls; retention 0.3 keeps int(3.0) = 3 calls (step 0's two, step 1's cond).
    cache = MagCache(10.0, 10, 0.3, [[1.0] * 5, [1.0] * 5], num_steps=5)
    run(cache, 5, branches=2)
    assert [t["reused"] for t in cache.trace] == [False, False, True, True, True]
    assert cache.trace[1]["run"] == [0, 1]  # step 1: only the unconditional call (call 3) is past retention


def test_each_branch_follows_its_own_curve() -> None:
    # the unconditional curve drifts fast: its error blocks every reuse, so the batch computes every step.
    cache = MagCache(0.15, 10, 0.0, [[1.0] * 6, [0.8] * 6], num_steps=6)
    run(cache, 6, branches=2)
    assert not any(t["reused"] for t in cache.trace)
    one = MagCache(0.15, 10, 0.0, [[1.0] * 6], num_steps=6)  # a single curve serves every branch
    run(one, 6, branches=2)
    assert [t["reused"] for t in one.trace] == [False] + [True] * 5


def test_threshold_zero_computes_everything_and_reset_forgets() -> None:
    cache = MagCache(0.0, 5, 0.0, [[1.0] * 6], num_steps=6)
    run(cache, 6)
    assert cache.stats.forwards_reused == 0
    warm = MagCache(10.0, 5, 0.0, [[1.0] * 6], num_steps=6)
    run(warm, 3)
    warm.reset()
    assert warm.residual is None and warm.extra_bytes() == 0


def test_nearest_resampling_is_the_reference_interpolation() -> None:
    curve = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert nearest_resample(curve, 3) == [1.0, 3.0, 5.0]
    assert nearest_resample(curve, 1) == [5.0]
    # indices round(0, 0.5, 1, ..., 4) with half to even (np.round): 0 0 1 2 2 2 3 4 4
    assert nearest_resample(curve, 9) == [1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 4.0, 5.0, 5.0]
    resampled = MagCache(0.1, 2, 0.2, [curve], num_steps=3)
    assert resampled.curves == [[1.0, 3.0, 5.0]]


def test_resolution_fills_the_published_curves_and_refuses_a_model_without() -> None:
    model = wan_description(WAN_PRESETS["wan2.1-t2v-1.3b"])
    resolved = GenerationParams(prompt="p", cache={"kind": "magcache"}).resolve(model)
    assert resolved.cache.ratios == WAN_MAGCACHE_RATIOS["wan2.1-t2v-1.3b"]
    assert len(resolved.cache.ratios) == 2 and len(resolved.cache.ratios[0]) == 50
    tiny = wan_description(WAN_PRESETS["wan-tiny"])
    with pytest.raises(ValueError, match="cache"):
        GenerationParams(prompt="p", cache={"kind": "magcache"}).check(tiny)
    given = GenerationParams(prompt="p", cache={"kind": "magcache", "ratios": [[1.0, 0.9]]}).resolve(tiny)
    assert given.cache.ratios == ((1.0, 0.9),)
    with pytest.raises(ValidationError, match="max_skip_steps"):
        GenerationParams(prompt="p", cache={"kind": "magcache", "max_skip_steps": 0})
