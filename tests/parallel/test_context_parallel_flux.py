"""FLUX.1 under context parallelism equals the single-rank result (CPU, gloo, 4 spawned processes).

The end-to-end check of joint attention: `stages.denoise.DenoiseStage` / `BlockRunner` shard the image
tokens, keep the text tokens replicated and run a tiny random-weight `FluxTransformer` (double- and
single-stream blocks) for a few flowmatch-euler steps with distilled guidance. One spawn of 4 ranks runs
every layout (ranks outside a smaller layout only take part in creating its groups); the single-rank
reference runs in this process with the same seeded weights. The image is 80 x 112 pixels, a 5 x 7 grid
of 35 image tokens, with 7 text tokens: no world size here divides either, so every layout pads the
image shards and must drop the padded keys, and the text is never split evenly.

Tolerance: fp32 latents (values O(1)) within 2e-5 absolute. The parallel paths sum the same terms in
another order (log-sum-exp merges, per-shard GEMMs): measured at most 1e-6 for every layout; a
missing key mask, a wrong RoPE slice or a wrong head slice of the text gives differences of order 0.1-1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parallel.launch import run_local
from parallel.mesh import ParallelLayout, ParallelMesh

LAYOUTS = {
    "ulysses2": ParallelLayout(ulysses_degree=2),
    "ring2": ParallelLayout(ring_degree=2),
    "ulysses2xring2": ParallelLayout(ring_degree=2, ulysses_degree=2),
}
WORLD = 4
TOLERANCE = 2e-5
HEIGHT, WIDTH = 80, 112  # latent 10 x 14 -> a 5 x 7 grid = 35 image tokens
TEXT_LEN = 7
STEPS = 3


def _config():
    from models.flux.config import FluxDiTConfig

    # 4 heads so Ulysses 2 keeps two heads per rank and a wrong head order shows.
    return FluxDiTConfig(hidden_size=64, num_heads=4, num_double_blocks=2, num_single_blocks=2, context_dim=48,
                         pooled_dim=24, axes_dims_rope=(4, 6, 6), guidance_embed=True)


def _stage(mesh: ParallelMesh | None = None):
    from models.flux.transformer import FluxTransformer
    from models.random_init import randomize_parameters
    from stages.denoise import DenoiseStage

    model = FluxTransformer(_config()).eval()
    randomize_parameters(model, seed=5)
    return DenoiseStage([model], mesh=mesh, guidance="distilled", teacache_signals={"default": "modulated_input"})


def _job(stage, cache: dict | None = None):
    """A flowmatch-euler job with FLUX.1-dev's distilled guidance and its dynamic shift for this size."""
    from models.conditioning import Conditioning
    from stages.embeddings import PromptEmbeddings
    from stages.params import ResolvedParams
    from stages.samplers import flux_image_seq_len, flux_shift

    config = _config()
    params = ResolvedParams(prompt="p", negative_prompt="", height=HEIGHT, width=WIDTH, num_frames=1,
                            num_inference_steps=STEPS, guidance_scale=3.5, guidance_scale_2=3.5,
                            shift=flux_shift(flux_image_seq_len(HEIGHT, WIDTH)), seed=3, sampler="flowmatch-euler",
                            fps=1, guidance="distilled", cache=cache)
    generator = torch.Generator().manual_seed(11)
    prompt = Conditioning(torch.randn(TEXT_LEN, config.context_dim, generator=generator),
                          torch.randn(config.pooled_dim, generator=generator))
    return stage.start(params, PromptEmbeddings(prompt, None))


def _denoise(stage) -> np.ndarray:
    return stage.run_steps(_job(stage)).latents.numpy()


# (spec, its measured indicator trace on this model): FBCache's (and DBCache F1's) first-block changes 0.87,
# 0.83 -> one step computed, one reused at 0.85; TeaCache's (identity polynomial) middle step 0.43 -> reused
# at 0.5.
CACHES = {
    "fbcache0": {"kind": "fbcache", "threshold": 0.0},
    "fbcache": {"kind": "fbcache", "threshold": 0.85},
    "teacache0": {"kind": "teacache", "threshold": 0.0, "coefficients": [1.0, 0.0]},
    "teacache": {"kind": "teacache", "threshold": 0.5, "coefficients": [1.0, 0.0]},
    "dbcache0": {"kind": "dbcache", "threshold": 0.0, "first_blocks": 1, "last_blocks": 1, "warmup_steps": 0},
    "dbcache": {"kind": "dbcache", "threshold": 0.85, "first_blocks": 1, "last_blocks": 1, "warmup_steps": 0},
    "pab0": {"kind": "pab", "self_range": 1, "cross_range": 1},
    "pab": {"kind": "pab", "self_range": 2, "warmup": 1, "cooldown": 0},  # step 2 reuses every joint attention
    "meancache0": {"kind": "meancache", "fresh_steps": 3},
    "meancache": {"kind": "meancache", "fresh_steps": 2},  # steps 0, 2 fresh; step 1 extrapolated
    "blockdance0": {"kind": "blockdance", "boundary_block": 1, "group_size": 1},
    "blockdance": {"kind": "blockdance", "boundary_block": 1, "warmup": 0, "cooldown": 0},  # step 2 skips 2 blocks
    "taylorseer0": {"kind": "taylorseer", "interval": 1},
    "taylorseer": {"kind": "taylorseer", "interval": 2, "warmup_steps": 2},  # step 2 forecasts every block, order 1
    "dbcache_taylorseer0": {"kind": "dbcache", "threshold": 0.0, "first_blocks": 1, "last_blocks": 1,
                            "warmup_steps": 0, "taylorseer": True},
    "dbcache_taylorseer": {"kind": "dbcache", "threshold": 0.85, "first_blocks": 1, "last_blocks": 1,
                           "warmup_steps": 0, "taylorseer": True},
}


def _denoise_cached(stage) -> dict[str, object]:
    """Each of CACHES: latents, each step's indicator values and the counts."""
    out: dict[str, object] = {}
    for name, spec in CACHES.items():
        job = stage.run_steps(_job(stage, spec))
        if spec["kind"] in ("fbcache", "dbcache"):
            trace = job.cache.changes
        elif spec["kind"] == "teacache":
            trace = [t["delta"] for t in job.cache.trace]
        else:
            trace = [[float(r) for r in d.values()] for _, d in sorted(job.cache.decisions.items())]
        out[name] = (job.latents.numpy(), trace, job.cache.stats.as_dict())
    return out


def _all_layouts(rank: int, world: int) -> dict[str, np.ndarray]:
    """On every rank: build each layout's mesh over its first ranks and denoise with it."""
    torch.set_num_threads(1)
    results = {}
    for name, layout in LAYOUTS.items():
        mesh = ParallelMesh.build(layout, ranks=range(layout.world_size))
        if mesh is not None:
            stage = _stage(mesh)
            results[name] = _denoise(stage)
            results[name + "/cache"] = _denoise_cached(stage)
    return results


@pytest.fixture(scope="module")
def parallel_results() -> list[dict[str, np.ndarray]]:
    return run_local(_all_layouts, WORLD, backend="gloo", timeout_s=300)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return _denoise(_stage())


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_flux_layout_matches_single_rank(name: str, parallel_results, reference) -> None:
    layout = LAYOUTS[name]
    outputs = [parallel_results[rank][name] for rank in range(layout.world_size)]
    assert outputs[0].shape == (16, HEIGHT // 8, WIDTH // 8)
    for rank, latents in enumerate(outputs):
        # Every rank ends with the full, identical latents (replicated sampler state).
        np.testing.assert_array_equal(latents, outputs[0], err_msg=f"{name}: rank {rank} differs from rank 0")
    diff = float(np.abs(outputs[0] - reference).max())
    assert diff <= TOLERANCE, f"{name}: max |parallel - single rank| = {diff:.3g} > {TOLERANCE}"


def test_the_denoising_moves_the_latents(reference) -> None:
    """The agreement above is not trivial: the steps change the noise by far more than the tolerance."""
    stage = _stage()
    noise = _job(stage).latents.numpy()
    assert float(np.abs(reference - noise).max()) > 0.5


@pytest.fixture(scope="module")
def cached_reference() -> dict[str, object]:
    return _denoise_cached(_stage())


@pytest.mark.parametrize("kind", ["fbcache", "dbcache", "teacache", "pab", "taylorseer", "dbcache_taylorseer",
                                  "meancache", "blockdance"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_caches_decide_on_every_rank_as_on_one(name: str, kind: str, parallel_results, cached_reference) -> None:
    """Threshold 0 is the uncached parallel run bit for bit; at the real threshold every rank measures the
    same indicator as one rank (sums over all ranks' real tokens), so all take the single rank's decisions."""
    layout = LAYOUTS[name]
    per_rank = [parallel_results[rank][name + "/cache"] for rank in range(layout.world_size)]
    latents0, _, stats0 = per_rank[0][kind + "0"]
    np.testing.assert_array_equal(latents0, parallel_results[0][name])
    assert stats0["forwards_reused"] == stats0["attention_reused"] == 0
    ref_latents, ref_trace, ref_stats = cached_reference[kind]
    assert ref_stats["forwards_reused"] + ref_stats["attention_reused"] > 0, \
        "the setting must make the single rank reuse something"
    for rank, results in enumerate(per_rank):
        latents, trace, stats = results[kind]
        decisions = {k: v for k, v in stats.items() if k != "peak_extra_bytes"}
        assert decisions == {k: v for k, v in ref_stats.items() if k != "peak_extra_bytes"}, \
            f"{name}: rank {rank} took other decisions"
        if kind == "meancache":  # step-level: whole latents and velocities on every rank
            assert stats["peak_extra_bytes"] == ref_stats["peak_extra_bytes"] > 0
        else:
            assert 0 < stats["peak_extra_bytes"] < ref_stats["peak_extra_bytes"]  # a rank caches its shard only
        np.testing.assert_allclose(np.array(trace[1:]), np.array(ref_trace[1:]), rtol=1e-5)
        diff = float(np.abs(latents - ref_latents).max())
        assert diff <= TOLERANCE, f"{name}: rank {rank} cached latents differ by {diff:.3g}"
