"""BlockDance: the window and group schedule, the reuse of the stored boundary states (image and text tokens),
off, reset and the boundary check. Through the real pipelines: test_every_kind_in_the_pipelines.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flexcache.blockdance import BlockDance
from flexcache.hooks import StepInfo

BLOCKS = 4


def run_step(cache: BlockDance, step: int, img: torch.Tensor, txt: torch.Tensor | None,
             calls: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward of BLOCKS blocks; block i adds 10 ** i (and step + 1 to the text), recording (step, i)."""
    info = StepInfo(step, 1000.0, img.shape[0], BLOCKS)
    for index in range(BLOCKS):
        def compute(img, txt, index=index):  # noqa: ANN001, ANN202
            calls.append((step, index))
            return img + 10 ** index, (None if txt is None else txt + step + 1)
        img, txt = cache.block(info, index, nn.Identity(), compute, img, txt)
    return img, txt


def reused_steps(num_steps: int, **knobs) -> list[int]:  # noqa: ANN003
    cache = BlockDance(**{"boundary_block": 1, "group_size": 2, "start_fraction": 0.40, "end_fraction": 0.95,
                          "warmup": 5, "cooldown": 5} | knobs, num_steps=num_steps)
    return [s for s in range(num_steps) if cache.reuses(s)]


def test_the_window_and_the_groups() -> None:
    # 50 steps: window [max(5, 20), min(45, round(47.5) = 48)) = [20, 45); groups of 2 from 20
    assert reused_steps(50) == list(range(21, 45, 2))
    # groups of 3: 20 stores, 21 and 22 reuse, 23 stores, ...; the last group (44) is cut by the window
    assert reused_steps(50, group_size=3) == [s for s in range(20, 45) if (s - 20) % 3]
    # 8 steps without warm-up or cool-down: [round(3.2) = 3, round(7.6) = 8) -> 3 stores, 4 reuses, ...
    assert reused_steps(8, warmup=0, cooldown=0) == [4, 6]
    # 10 steps: round(4.0) = 4 vs warm-up 5 -> [5, min(5, 10)) is empty
    assert reused_steps(10) == []
    assert reused_steps(50, group_size=1) == []


def test_a_reuse_step_starts_at_the_boundary_from_the_stored_states() -> None:
    cache = BlockDance(1, 2, 0.0, 1.0, 0, 0, num_steps=4)  # window [0, 4): steps 0, 2 store; 1, 3 reuse
    calls: list[tuple[int, int]] = []
    img, txt = torch.zeros(2, 3, 1), torch.zeros(2, 1, 1)
    outs = [run_step(cache, step, img + step, txt, calls) for step in range(4)]
    assert calls == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (2, 3), (3, 2), (3, 3)]
    # step 1 resumes from step 0's states after block 1 (img 0 + 1 + 10, txt 0 + 1 + 1), then blocks 2, 3
    torch.testing.assert_close(outs[1][0], torch.full((2, 3, 1), 11.0 + 100 + 1000))
    torch.testing.assert_close(outs[1][1], torch.full((2, 1, 1), 2.0 + 2 + 2))
    torch.testing.assert_close(outs[3][0], torch.full((2, 3, 1), 2 + 11.0 + 100 + 1000))  # step 2's states
    assert cache.decisions == {0: {"reused": False}, 1: {"reused": True}, 2: {"reused": False}, 3: {"reused": True}}
    assert (cache.stats.forwards_computed, cache.stats.forwards_reused) == (2, 2)
    assert (cache.stats.blocks_computed, cache.stats.blocks_reused) == (12, 4)
    assert cache.extra_bytes() == (6 + 2) * 4


def test_an_image_only_model_stores_its_image_tokens() -> None:
    cache = BlockDance(0, 3, 0.0, 1.0, 0, 0, num_steps=3)
    calls: list[tuple[int, int]] = []
    outs = [run_step(cache, step, torch.full((1, 2, 1), float(step)), None, calls) for step in range(3)]
    assert [c for c in calls if c[1] == 0] == [(0, 0)]
    torch.testing.assert_close(outs[2][0], torch.full((1, 2, 1), 1111.0))
    assert outs[2][1] is None


def test_group_size_one_computes_everything_bit_for_bit() -> None:
    cache = BlockDance(1, 1, 0.0, 1.0, 0, 0, num_steps=4)
    calls: list[tuple[int, int]] = []
    for step in range(4):
        img = torch.randn(1, 3, 2)
        expected = img + 1 + 10 + 100 + 1000
        assert torch.equal(run_step(cache, step, img, None, calls)[0], expected)
    assert len(calls) == 16 and cache.stats.forwards_reused == 0 and cache.extra_bytes() == 0


def test_after_reset_a_reuse_step_computes_and_does_not_store() -> None:
    cache = BlockDance(1, 3, 0.0, 1.0, 0, 0, num_steps=3)
    calls: list[tuple[int, int]] = []
    run_step(cache, 0, torch.zeros(1, 2, 1), None, calls)
    cache.reset()  # e.g. Wan2.2's expert switch
    run_step(cache, 1, torch.zeros(1, 2, 1), None, calls)
    run_step(cache, 2, torch.zeros(1, 2, 1), None, calls)
    assert len(calls) == 12 and cache.stats.forwards_reused == 0 and cache.extra_bytes() == 0


def test_states_of_another_shape_are_not_reused() -> None:
    cache = BlockDance(1, 2, 0.0, 1.0, 0, 0, num_steps=2)
    calls: list[tuple[int, int]] = []
    run_step(cache, 0, torch.zeros(2, 3, 1), None, calls)
    run_step(cache, 1, torch.zeros(1, 3, 1), None, calls)  # one branch now
    assert len(calls) == 8 and cache.decisions[1] == {"reused": False}


def test_the_boundary_must_leave_a_block_to_compute() -> None:
    cache = BlockDance(BLOCKS - 1, 2, 0.0, 1.0, 0, 0, num_steps=2)
    with pytest.raises(ValueError, match="boundary_block"):
        run_step(cache, 0, torch.zeros(1, 2, 1), None, [])
    with pytest.raises(ValueError, match="boundary_block"):
        BlockDance(-1, 2, 0.0, 1.0, 0, 0, num_steps=2)


def test_resolution_refuses_a_boundary_that_leaves_no_block_naming_the_field() -> None:
    from pydantic import ValidationError

    from models.wan.config import PRESETS
    from models.wan.family import description
    from stages.params import GenerationParams

    model = description(PRESETS["wan-tiny-shapes"])  # 4 blocks: boundary_block at most 2
    assert GenerationParams(prompt="p", cache={"kind": "blockdance", "boundary_block": 2}).resolve(model).cache
    with pytest.raises(ValidationError, match=r"cache must be .*boundary_block \(the last reused block\) is at most 2"):
        GenerationParams(prompt="p", cache={"kind": "blockdance"}).resolve(model)
