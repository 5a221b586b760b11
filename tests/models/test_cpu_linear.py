"""`PackedLinear.part`: one block of a layer's GEMM, packed on its own, equal to the plain block product."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from models.cpu_linear import PackedLinear

ROWS = 48  # above PackedLinear.min_rows, so the packed path runs where the build has the ops


def layer(dtype: torch.dtype, seed: int = 0) -> PackedLinear:
    gen = torch.Generator().manual_seed(seed)
    lin = PackedLinear(40, 56)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(56, 40, generator=gen) * 0.2)
        lin.bias.copy_(torch.randn(56, generator=gen))
    return lin.to(dtype).requires_grad_(False)


def tolerance(dtype: torch.dtype) -> dict:
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_part_equals_the_plain_block_product(dtype: torch.dtype) -> None:
    lin = layer(dtype)
    x = torch.randn(2, ROWS // 2, 40, generator=torch.Generator().manual_seed(1))
    xs = x[..., :24].to(dtype)
    w, b = lin.weight.float(), lin.bias.float()
    rows, cols = slice(8, 40), slice(0, 24)
    tol = tolerance(dtype)
    expected = F.linear(x.float(), w[rows], b[rows])
    torch.testing.assert_close(lin.part(x, rows).float(), expected, **tol)
    torch.testing.assert_close(lin.part(x, rows, gelu=True).float(), F.gelu(expected, approximate="tanh"), **tol)
    acc = torch.randn(2, ROWS // 2, 56, generator=torch.Generator().manual_seed(2)).to(dtype)
    no_bias = F.linear(xs.float(), w[:, cols])
    torch.testing.assert_close(lin.part(xs, cols=cols, bias=False, accumulate=acc).float(), no_bias + acc.float(),
                               **tol)
    # the two column blocks summed are the whole layer (FLUX's linear2 without the concatenation)
    whole = lin(x)
    first = lin.part(x[..., :24], cols=slice(0, 24))
    torch.testing.assert_close(lin.part(x[..., 24:], cols=slice(24, None), bias=False, accumulate=first).float(),
                               whole.float(), **tol)
    with pytest.raises(ValueError, match="either the GELU or the accumulation"):
        lin.part(x, gelu=True, accumulate=acc)


@torch.no_grad()
def test_part_packs_each_block_once_and_follows_the_weight() -> None:
    lin = layer(torch.bfloat16)
    x = torch.randn(ROWS, 40).bfloat16()
    y = lin.part(x, slice(0, 16))
    if not lin._parts:
        pytest.skip("this torch build has no oneDNN packing ops (or no bf16 support)")
    assert lin._packed is None and len(lin._parts) == 1 and lin.packed_bytes > 0
    pack = next(iter(lin._parts.values())).weight
    assert torch.equal(lin.part(x, slice(0, 16)), y) and next(iter(lin._parts.values())).weight is pack
    lin.part(x, slice(16, None), gelu=True)
    assert len(lin._parts) == 2
    # an in-place write through the parameter re-packs the block; the result follows the new weight
    lin.weight.mul_(2)
    torch.testing.assert_close(lin.part(x, slice(0, 16)).float(),
                               F.linear(x, lin.weight[:16], lin.bias[:16]).float(), atol=0.05, rtol=0.02)
    # pickling, deepcopy and .to() drop the packs
    for clone in (pickle.loads(pickle.dumps(lin)), copy.deepcopy(lin)):
        assert not clone._parts and clone.packed_bytes == 0
    lin.to(torch.float32)
    assert not lin._parts


def test_part_under_autograd_takes_the_plain_path() -> None:
    lin = layer(torch.float32).requires_grad_(True)
    x = torch.randn(ROWS, 40, requires_grad=True)
    lin.part(x, slice(0, 16), gelu=True).sum().backward()
    assert not lin._parts and lin.weight.grad is not None and x.grad is not None
    assert lin.weight.grad[16:].abs().max() == 0 and lin.weight.grad[:16].abs().max() > 0
