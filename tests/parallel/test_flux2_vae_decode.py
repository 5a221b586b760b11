"""Patch-parallel FLUX.2 VAE decode: strips decoded on 2 gloo ranks reassemble to the single-rank decode.

A tiny random FLUX.2 VAE (widths 32, 32, 64: stride 4, then the 2x2 latent patches: 8 pixels per DiT latent
row; GroupNorm 32 groups; every parameter and the BatchNorm statistics random; fp32) and DiT latents of
5 x 4 rows x columns, so the strips are uneven (3 + 2) and the BatchNorm denormalisation, the patch unfold,
the halo exchange, the all-reduced GroupNorm statistics and the gathered attention all run on strips.
One spawn runs every check.
"""

from __future__ import annotations

from typing import Any

import torch

from models.flux2.tiny import randomize_batch_norm
from models.flux2.vae import Flux2VAE
from models.flux2.vae_config import Flux2VAEConfig
from models.random_init import randomize_parameters
from parallel.flux_vae_decode import FluxRowSplit, decode_patch_parallel_flux
from parallel.launch import run_local
from parallel.vae_decode import strip_rows
from stages.decode import _row_split

CONFIG = Flux2VAEConfig(block_out_channels=(32, 32, 64), layers_per_block=1)
LATENTS = (2, 128, 5, 4)  # 40 x 32 pixels
# Float summation order only (strip sums, two-pass norm statistics, 1 thread per rank), as for FLUX.1's
# decode: measured max |parallel - single| = 4.6e-6 on 2 ranks and 5.1e-6 on 3 ranks at |out| <= 2.7.
ATOL = 1e-5
ALONE_MIN_DIFF = 0.1  # each strip decoded alone (zero pad at its cut, its own norm stats) is at least this far off


def _vae() -> Flux2VAE:
    return randomize_batch_norm(randomize_parameters(Flux2VAE(CONFIG).eval(), seed=0), seed=1)


def _latents() -> torch.Tensor:
    return torch.randn(LATENTS, generator=torch.Generator().manual_seed(2))


def _rank_checks(rank: int, world_size: int) -> dict[str, Any]:
    """On every rank: the parallel decode, this rank's strip decoded alone, and the too-many-ranks error."""
    vae, z = _vae(), _latents()
    rows = strip_rows(z.shape[-2], world_size)
    offset = sum(rows[:rank])
    with torch.no_grad():
        result: dict[str, Any] = {
            "images": decode_patch_parallel_flux(vae, z).numpy(),
            "alone": vae.decode(z[..., offset:offset + rows[rank], :]).numpy(),
        }
    try:
        decode_patch_parallel_flux(vae, z[..., :world_size - 1, :])
    except ValueError as exc:
        result["error"] = str(exc)
    return result


def test_the_decode_stage_shares_groupnorm_statistics() -> None:
    assert _row_split(Flux2VAE(CONFIG)) is FluxRowSplit


def test_strips_reassemble_to_the_single_rank_decode() -> None:
    with torch.no_grad():
        single = _vae().decode(_latents())
    results = run_local(_rank_checks, 2, backend="gloo", threads_per_rank=1, timeout_s=120)
    assert single.shape == (2, 3, 40, 32)
    for rank, result in enumerate(results):
        images = torch.from_numpy(result["images"])
        torch.testing.assert_close(images, single, atol=ATOL, rtol=0, msg=lambda m: f"rank {rank}: {m}")
        assert "1 latent rows over 2 ranks" in result["error"] and "at least 16 pixels high" in result["error"]
    alone = torch.cat([torch.from_numpy(r["alone"]) for r in results], dim=-2)
    assert (alone - single).abs().max() > ALONE_MIN_DIFF
