"""The block-loop runner: on one rank it is the model's own forward, bit for bit, for every family; its hook
points see every step, block and attention call with what they are; and a hook can replace the work it wraps
(what a feature cache does). The parallel paths run the same loop (tests/parallel/test_context_parallel*.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from flexcache.hooks import ForwardHooks, StepInfo
from models.attention import AttentionMeta
from models.conditioning import Conditioning
from models.flux.config import FLUX_TINY
from models.flux.transformer import FluxTransformer
from models.random_init import randomize_parameters
from models.wan.config import WAN_TINY
from models.wan.transformer import WanTransformer
from stages.runner import BlockRunner

SMALL_FLUX = replace(FLUX_TINY, hidden_size=64, num_heads=2, axes_dims_rope=(8, 12, 12), context_dim=24,
                     pooled_dim=16)


def _wan() -> tuple[WanTransformer, torch.Tensor, torch.Tensor, list[Conditioning], None, tuple]:
    model = randomize_parameters(WanTransformer(WAN_TINY), seed=3).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 2, 4, 6, generator=gen)
    contexts = [torch.randn(n, WAN_TINY.text_dim, generator=gen) for n in (5, 9)]
    return model, x, torch.tensor([700.0, 700.0]), [Conditioning(c) for c in contexts], None, (x, torch.tensor(
        [700.0, 700.0]), contexts)


def _flux() -> tuple[FluxTransformer, torch.Tensor, torch.Tensor, list[Conditioning], torch.Tensor, tuple]:
    model = randomize_parameters(FluxTransformer(SMALL_FLUX), seed=4).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 6, 4, generator=gen)
    context, pooled = torch.randn(1, 5, 24, generator=gen), torch.randn(1, 16, generator=gen)
    t, guidance = torch.tensor([500.0]), torch.tensor([3.5])
    return model, x, t, [Conditioning(context[0], pooled[0])], guidance, (x, t, context, pooled, guidance)


FAMILIES = {"wan": _wan, "flux": _flux}


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_one_rank_is_the_models_own_forward(family: str) -> None:
    model, x, t, conditioning, guidance, forward_args = FAMILIES[family]()
    expected = model(*forward_args)
    assert torch.equal(BlockRunner(model)(x, t, conditioning, guidance), expected)


class Recorder(ForwardHooks):
    """Records every hook call; optionally skips one block (returns its inputs), as a block cache would."""

    def __init__(self, skip_block: int | None = None) -> None:
        self.calls: list[tuple] = []
        self.skip_block = skip_block

    def step(self, info: StepInfo, compute):  # noqa: ANN001, ANN201
        self.calls.append(("step", info.step, info.timestep, info.branches))
        return compute()

    def block(self, info, index, block, compute, img, txt):  # noqa: ANN001, ANN201
        self.calls.append(("block", index))
        return (img, txt) if index == self.skip_block else compute(img, txt)

    def attention(self, info, meta: AttentionMeta, compute, q, k, v):  # noqa: ANN001, ANN201
        self.calls.append(("attention", meta.layer, meta.kind, meta.text_len))
        return compute(q, k, v, meta)


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_hooks_see_every_step_block_and_attention_call(family: str) -> None:
    model, x, t, conditioning, guidance, _ = FAMILIES[family]()
    runner = BlockRunner(model)
    plain = runner(x, t, conditioning, guidance)
    hooks = Recorder()
    assert torch.equal(runner(x, t, conditioning, guidance, hooks=hooks, step=4), plain)  # hooks that compute all
    assert hooks.calls[0] == ("step", 4, float(t[0]), x.shape[0])
    blocks = len(model.blocks)
    if family == "wan":  # self-attention, then cross-attention to the text, per block
        per_block = [lambda i: ("attention", i, "self", 0), lambda i: ("attention", i, "cross", 0)]
    else:  # one joint attention with the 5 text rows first, per block (double, then single)
        per_block = [lambda i: ("attention", i, "joint", 5)]
    expected = [("step", 4, float(t[0]), x.shape[0])]
    for i in range(blocks):
        expected += [("block", i)] + [make(i) for make in per_block]
    assert hooks.calls == expected


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_a_hook_can_replace_the_work_it_wraps(family: str) -> None:
    model, x, t, conditioning, guidance, _ = FAMILIES[family]()
    runner = BlockRunner(model)
    plain = runner(x, t, conditioning, guidance)
    skipping = Recorder(skip_block=1)
    skipped = runner(x, t, conditioning, guidance, hooks=skipping)
    assert not torch.allclose(skipped, plain)
    assert ("attention", 1, "joint" if family == "flux" else "self", 5 if family == "flux" else 0) not in \
        skipping.calls  # the skipped block attended to nothing

    class Cached(ForwardHooks):
        def step(self, info, compute):  # noqa: ANN001, ANN201
            return plain  # a step-level cache answers without computing

    begins: list[int] = []
    begin = model.begin
    model.begin = lambda *args: begins.append(1) or begin(*args)
    try:
        assert runner(x, t, conditioning, guidance, hooks=Cached()) is plain
    finally:
        del model.begin
    assert begins == []
    # After a hooked call the runner is back to plain compute.
    assert torch.equal(runner(x, t, conditioning, guidance), plain)
