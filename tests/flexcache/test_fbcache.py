"""FBCache: its decisions on a hand-made residual trace, per-branch state, threshold 0 = full compute bit
for bit through the real pipelines (Wan with CFG and two experts, FLUX), reuse at a real threshold, and the
expert-switch reset."""

from __future__ import annotations


import pytest
import torch

from flexcache.fbcache import FirstBlockCache
from flexcache.hooks import StepInfo
from stages.pipeline import Pipeline

NUM_BLOCKS = 3


def forward(cache: FirstBlockCache, img: torch.Tensor, r1: torch.Tensor, rest: float, step: int) -> torch.Tensor:
    """One forward over three toy blocks: block 0 adds r1, blocks 1 and 2 add `rest` each."""
    info = StepInfo(step, 1000.0 - step, img.shape[0], NUM_BLOCKS)
    txt = None
    for index in range(NUM_BLOCKS):
        def compute(x: torch.Tensor, t: None, index: int = index) -> tuple[torch.Tensor, None]:
            return (x + r1 if index == 0 else x + rest), t
        img, txt = cache.block(info, index, torch.nn.Identity(), compute, img, txt)
    return img


def test_decisions_follow_the_relative_change_of_the_first_residual() -> None:
    cache = FirstBlockCache(threshold=0.1)
    x = torch.ones(1, 4, 2)
    # relative changes of r1 against the previous step's: -, 0.05, 0.2, 0.05 (computed, reused, computed, reused)
    scales = [1.0, 1.05, 1.26, 1.323]
    outs = [forward(cache, x * (s + 1), torch.full_like(x, s), rest=0.5, step=i) for i, s in enumerate(scales)]
    changes = [c[0] for c in cache.changes]
    assert changes[0] == float("inf")
    assert changes[1:] == pytest.approx([0.05, 0.2, 0.05], rel=1e-6)
    assert cache.stats.as_dict() | {"peak_extra_bytes": 0} == {
        "forwards_computed": 2, "forwards_reused": 2, "blocks_computed": 2 * 3 + 2 * 1, "blocks_reused": 2 * 2,
        "attention_computed": 0, "attention_reused": 0, "peak_extra_bytes": 0}
    # computed steps: input + r1 + 2 * 0.5; reused steps: input + the whole stack's residual of the last
    # computed step (step 0: 1 + 1.0; step 2: 1.26 + 1.0)
    torch.testing.assert_close(outs[0], x * 2 + 1 + 1.0)
    torch.testing.assert_close(outs[1], x * 2.05 + 2.0)
    torch.testing.assert_close(outs[2], x * 2.26 + 1.26 + 1.0)
    torch.testing.assert_close(outs[3], x * 2.323 + 2.26)
    assert cache.stats.peak_extra_bytes == 2 * x.numel() * 4  # the previous r1 and the stack's residual


def test_each_branch_keeps_its_own_history_and_the_batch_skips_only_if_all_may() -> None:
    cache = FirstBlockCache(threshold=0.1)
    x = torch.ones(2, 4, 2)

    def r1(cond: float, uncond: float) -> torch.Tensor:
        return torch.stack([torch.full((4, 2), cond), torch.full((4, 2), uncond)])

    forward(cache, x, r1(1.0, 1.0), 0.5, 0)
    forward(cache, x, r1(1.05, 1.5), 0.5, 1)  # cond 0.05, uncond 0.5: computed
    forward(cache, x, r1(1.1, 1.55), 0.5, 2)  # 0.0476 and 0.0333: both may, reused
    assert [c for c in cache.changes[1]] == pytest.approx([0.05, 0.5])
    assert cache.changes[2] == pytest.approx([0.05 / 1.05, 0.05 / 1.5])
    assert (cache.stats.forwards_computed, cache.stats.forwards_reused) == (2, 1)


def test_reset_forgets_the_history() -> None:
    cache = FirstBlockCache(threshold=0.5)
    x = torch.ones(1, 4, 2)
    forward(cache, x, torch.ones_like(x), 0.5, 0)
    cache.reset()
    forward(cache, x, torch.ones_like(x), 0.5, 1)  # identical r1, but no history: computed
    assert cache.stats.forwards_reused == 0 and cache.extra_bytes() > 0


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_threshold_zero_is_full_compute_bit_for_bit(family: str, request: pytest.FixtureRequest,
                                                    uncached) -> None:  # noqa: ANN001 - a fixture
    pipe, params, full = uncached(family, request)
    cached = pipe.generate(params | {"cache": {"kind": "fbcache", "threshold": 0.0}})
    assert full.cache is None and cached.cache["forwards_reused"] == 0
    assert cached.cache["forwards_computed"] == params["num_inference_steps"]
    assert torch.equal(full.latents, cached.latents)
    assert cached.params.cache is not None and cached.params.cache.threshold == 0.0


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_a_real_threshold_reuses_steps_and_stays_close(family: str, request: pytest.FixtureRequest,
                                                       uncached) -> None:  # noqa: ANN001 - a fixture
    pipe, params, full = uncached(family, request)
    cached = pipe.generate(params | {"cache": {"kind": "fbcache", "threshold": 1.0}})
    stats = cached.cache
    assert stats["forwards_reused"] > 0 and stats["blocks_reused"] > 0 and stats["peak_extra_bytes"] > 0
    assert stats["forwards_computed"] + stats["forwards_reused"] == params["num_inference_steps"]
    assert not torch.equal(full.latents, cached.latents)
    rel = (full.latents - cached.latents).norm() / full.latents.norm()
    assert rel < 1.0  # a random tiny model: only a sanity bound, the quality benchmark measures the rest


def test_the_expert_switch_resets_the_cache(wan_two_experts: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    resets: list[int] = []
    original = FirstBlockCache.reset

    def counting_reset(self: FirstBlockCache) -> None:
        resets.append(1)
        original(self)

    monkeypatch.setattr(FirstBlockCache, "reset", counting_reset)
    wan_two_experts.generate({"prompt": "a red circle", "height": 32, "width": 32, "num_frames": 5, "seed": 2,
                              "num_inference_steps": 8, "cache": {"kind": "fbcache", "threshold": 0.5}})
    assert len(resets) == 2  # at construction and once at the switch to the low-noise expert
