"""TeaCache: the reference decision rule on a hand-made signal trace (accumulation of the rescaled change,
forced steps of both modes, per-branch state) and the published coefficients filled in at resolution.
Through the real pipelines: test_every_kind_in_the_pipelines.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from flexcache.hooks import StepInfo
from flexcache.teacache import TeaCache
from models.denoiser import CacheSignal
from models.flux.config import PRESETS as FLUX_PRESETS
from models.flux.family import description as flux_description
from stages.params import GenerationParams

IDENTITY = (1.0, 0.0)  # P(x) = x: the accumulated value is the sum of the raw relative changes


def run(cache: TeaCache, signals: list[torch.Tensor], num_blocks: int = 2) -> list[torch.Tensor]:
    """One forward per signal over toy blocks that each add 1 to the image tokens."""
    outs = []
    for step, values in enumerate(signals):
        info = StepInfo(step, 1000.0 - step, values.shape[0], num_blocks)
        cache.begin(info, lambda name, values=values: CacheSignal(values, per_token=False))
        img, txt = torch.full((values.shape[0], 3, 2), float(step)), None
        for index in range(num_blocks):
            img, txt = cache.block(info, index, torch.nn.Identity(), lambda x, t: (x + 1, t), img, txt)
        outs.append(img)
    return outs


def scaled(*factors: float) -> list[torch.Tensor]:
    return [torch.full((1, 4), f) for f in factors]


def test_the_rescaled_change_accumulates_until_the_threshold() -> None:
    cache = TeaCache(0.25, IDENTITY, "s", num_steps=7)
    # relative changes: -, 0.1, 0.1, 0.1, 0.1, 0.2 (last step forced)
    run(cache, scaled(1.0, 1.1, 1.21, 1.331, 1.4641, 1.75692))
    # step 1: acc 0.1 < 0.25 reuse; step 2: 0.2 reuse; step 3: 0.3 compute (acc 0); step 4: 0.1 reuse
    assert [t["reused"] for t in cache.trace] == [False, True, True, False, True, False]
    assert [round(t["acc"][0], 6) for t in cache.trace[1:5]] == [0.1, 0.2, 0.3, 0.1]
    assert (cache.stats.forwards_computed, cache.stats.forwards_reused) == (3, 3)
    assert cache.stats.blocks_reused == 3 * 2


def test_a_reused_step_adds_the_residual_of_the_last_computed_one() -> None:
    cache = TeaCache(0.5, IDENTITY, "s", num_steps=4)
    outs = run(cache, scaled(1.0, 1.1, 1.2, 1.3), num_blocks=3)
    assert [t["reused"] for t in cache.trace] == [False, True, True, False]
    for step, out in enumerate(outs):  # every path gives input + 3 here: the toy stack's residual is constant
        torch.testing.assert_close(out, torch.full_like(out, step + 3.0))


def test_forced_steps_of_each_mode() -> None:
    always_small = scaled(*[1.0 + 1e-6 * i for i in range(8)])
    default = TeaCache(1.0, IDENTITY, "s", num_steps=8)
    run(default, always_small)
    assert [t["reused"] for t in default.trace] == [False] + [True] * 6 + [False]  # first and last computed
    ret = TeaCache(1.0, IDENTITY, "s", num_steps=8, mode="ret_steps")
    run(ret, always_small)
    assert [t["reused"] for t in ret.trace] == [False] * 5 + [True] * 3  # the first five, not the last


def test_each_branch_accumulates_on_its_own() -> None:
    cache = TeaCache(0.25, IDENTITY, "s", num_steps=6)
    signals = [torch.tensor([[1.0], [1.0]]), torch.tensor([[1.1], [1.3]]), torch.tensor([[1.21], [1.3]])]
    run(cache, signals + [torch.tensor([[1.3], [1.3]])] * 3)
    assert cache.trace[1]["delta"] == pytest.approx([0.1, 0.3])
    assert cache.trace[1]["reused"] is False  # the uncond branch's 0.3 forces the batch; both accumulators reset
    assert cache.trace[2]["acc"] == pytest.approx([0.1, 0.0]) and cache.trace[2]["reused"] is True


def test_the_published_polynomial_is_evaluated_highest_order_first() -> None:
    dev = flux_description(FLUX_PRESETS["flux1-dev"]).teacache["default"].coefficients
    cache = TeaCache(0.25, dev, "s", num_steps=3)
    x = 0.05
    expected = sum(c * x ** (len(dev) - 1 - i) for i, c in enumerate(dev))
    assert float(cache.rescale(x)) == pytest.approx(expected) and np.isclose(expected, 0.1805, atol=1e-4)  # by hand


def test_resolution_fills_the_models_coefficients_or_refuses_naming_them() -> None:
    dev = flux_description(FLUX_PRESETS["flux1-dev"])
    resolved = GenerationParams(prompt="p", cache={"kind": "teacache", "threshold": 0.4}).resolve(dev)
    assert resolved.cache.coefficients == dev.teacache["default"].coefficients and resolved.cache.threshold == 0.4
    tiny = flux_description(FLUX_PRESETS["flux-tiny"])
    with pytest.raises(ValidationError, match="none are published or calibrated for its mode 'default'"):
        GenerationParams(prompt="p", cache={"kind": "teacache"}).resolve(tiny)
    with pytest.raises(ValidationError, match=r"mode is a TeaCache mode of flux1-dev \('default'\)"):
        GenerationParams(prompt="p", cache={"kind": "teacache", "mode": "ret_steps"}).resolve(dev)
