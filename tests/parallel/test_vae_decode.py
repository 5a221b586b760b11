"""Patch-parallel VAE decode: strips decoded on 2 and 3 gloo ranks reassemble to the single-rank decode.

A tiny random Wan VAE (base_dim 16, every parameter random, fp32) and latents of 7 x 6 rows x columns,
so the strips are uneven (4+3 and 3+2+2) and 3 latent frames exercise the causal cache across
chunks. One spawn per world size runs every check that needs a process group, including the
fallback of `DecodeStage.run(parallel=True)` (the call the VAE rank actors make) for too few rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from models.random_init import randomize_parameters
from models.wan.config import WanVAEConfig
from models.wan.vae import WanVAE
from parallel.launch import run_local
from parallel.vae_decode import decode_patch_parallel, strip_rows
from stages.decode import DecodeStage, to_uint8_frames

CONFIG = WanVAEConfig(base_dim=16)
LATENTS = (1, 16, 3, 7, 6)  # (B, z, T, H', W'): 9 frames of 56 x 48 pixels
# Measured (torch 2.13 CPU, gloo, 1 thread per rank, reference on the test's threads): max |parallel - single|
# = 2.9e-6 on 2 ranks, 2.7e-6 on 3 ranks, spread over all rows with no peak at the seams; the single-rank
# decode itself moves by 2.9e-6 between 1 and 2 threads, so this is float summation order.
ATOL = 1e-5
# Each strip decoded alone (zero padding at its cut, attention over its own rows) is this far off at least.
ALONE_MIN_DIFF = 0.1


def _vae() -> WanVAE:
    return randomize_parameters(WanVAE(CONFIG).eval(), seed=0)


def _latents() -> torch.Tensor:
    return torch.randn(LATENTS, generator=torch.Generator().manual_seed(1))


def _rank_checks(rank: int, world_size: int) -> dict[str, Any]:
    """Runs on every rank: the parallel decode, each strip decoded alone, and the too-many-ranks error.

    Videos go back as numpy arrays: a torch tensor would be shared by file descriptor through the
    result queue, and the rank process may be gone before the parent opens it.
    """
    vae, z = _vae(), _latents()
    rows = strip_rows(z.shape[-2], world_size)
    offset = sum(rows[:rank])
    result: dict[str, Any] = {
        "video": decode_patch_parallel(vae, z).numpy(),
        "alone": vae.decode(z[..., offset:offset + rows[rank], :]).numpy(),
    }
    try:
        decode_patch_parallel(vae, z[..., :world_size - 1, :])
    except ValueError as exc:
        result["error"] = str(exc)
    # The stage (what the VAE rank actors call) with too few rows to split; its split path runs in test_engine.
    result["frames_few_rows"] = DecodeStage(vae).run(z[0, ..., :world_size - 1, :], parallel=True)
    return result


@pytest.fixture(scope="module")
def single() -> torch.Tensor:
    return _vae().decode(_latents())


@pytest.mark.parametrize("world_size", [2, 3])
def test_strips_reassemble_to_the_single_rank_decode(world_size: int, single: torch.Tensor) -> None:
    results = run_local(_rank_checks, world_size, backend="gloo", threads_per_rank=1, timeout_s=120)

    assert single.shape == (1, 3, 9, 56, 48)
    assert (single.abs() < 1).float().mean() > 0.5, "most pixels should be unclamped, or the check is vacuous"
    for rank, result in enumerate(results):
        video = torch.from_numpy(result["video"])
        assert video.shape == single.shape, f"rank {rank}"
        torch.testing.assert_close(video, single, atol=ATOL, rtol=0, msg=lambda m: f"rank {rank}: {m}")

    # Without the halo exchange and the full-frame attention the strips do not add up: the check can fail.
    alone = torch.cat([torch.from_numpy(r["alone"]) for r in results], dim=-2)
    assert (alone - single).abs().max() > ALONE_MIN_DIFF

    # Too many ranks for the latent rows: a clear error on every rank, before any collective.
    for result in results:
        message = result["error"]
        assert f"{world_size - 1} latent rows over {world_size} ranks" in message
        assert f"use at most {world_size - 1} ranks" in message

    # DecodeStage.run(parallel=True) decodes a frame with fewer latent rows than ranks whole on every rank
    # instead of failing (uint8 rounding may flip where the thread count changes the float sums).
    few_rows = to_uint8_frames(_vae().decode(_latents()[..., :world_size - 1, :])[0]).astype(np.int16)
    for rank, result in enumerate(results):
        assert result["frames_few_rows"].shape == (9, 8 * (world_size - 1), 48, 3), f"rank {rank}"
        assert np.abs(result["frames_few_rows"] - few_rows).max() <= 1, f"rank {rank}"


def test_strip_rows_are_near_equal_and_cover_the_height() -> None:
    assert strip_rows(7, 2) == [4, 3]
    assert strip_rows(7, 3) == [3, 2, 2]
    assert strip_rows(8, 4) == [2, 2, 2, 2]
    assert strip_rows(1, 1) == [1]
    with pytest.raises(ValueError, match="cannot split 2 rows into 3 strips"):
        strip_rows(2, 3)
