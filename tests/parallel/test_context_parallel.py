"""Context and CFG parallelism equal the single-rank result (CPU, gloo, 4 spawned processes).

One spawn of 4 ranks runs a short guided denoising for every layout (ranks outside a smaller
layout only take part in creating its groups); the single-rank reference runs in this process
with the same seeded weights. The latent has 35 tokens, which no world size here divides, so
every layout pads the sequence and must mask the padded keys.

Tolerance: fp32 latents (values O(1)) within 2e-5 absolute. The parallel paths sum the same terms
in another order (log-sum-exp merges, per-shard and batch-1 GEMMs): measured 0 (ulysses2) to 8e-6 (cfg2); a missing mask,
a wrong RoPE slice or a swapped CFG branch gives differences of order 0.1-1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parallel.launch import run_local
from parallel.mesh import LayoutError, ParallelLayout, ParallelMesh, auto_layout

LAYOUTS = {
    "ulysses2": ParallelLayout(ulysses_degree=2),
    "ring2": ParallelLayout(ring_degree=2),
    "ring3": ParallelLayout(ring_degree=3),
    "ulysses2xring2": ParallelLayout(ring_degree=2, ulysses_degree=2),
    "cfg2": ParallelLayout(cfg_degree=2),
    "cfg2xulysses2": ParallelLayout(cfg_degree=2, ulysses_degree=2),
    "cfg2xring2": ParallelLayout(cfg_degree=2, ring_degree=2),
}
WORLD = 4
TOLERANCE = 2e-5
# 1 latent frame of 10 x 14 -> a 1 x 5 x 7 grid = 35 tokens (not a multiple of 2, 3 or 4).
HEIGHT, WIDTH, FRAMES = 80, 112, 1
STEPS = 3
HEADS = 4


def _stage(mesh: ParallelMesh | None = None):
    from dataclasses import replace

    from models.random_init import randomize_parameters
    from models.wan.config import WAN_TINY
    from models.wan.transformer import WanTransformer
    from stages.denoise import DenoiseStage

    model = WanTransformer(replace(WAN_TINY, num_heads=HEADS)).eval()
    randomize_parameters(model, seed=7)
    return DenoiseStage([model], mesh=mesh, teacache_signals={"default": "time_embedding"})


def _params():
    from stages.params import ResolvedParams

    return ResolvedParams(prompt="p", negative_prompt="n", height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                          num_inference_steps=STEPS, guidance_scale=5.0, guidance_scale_2=5.0, shift=3.0, seed=3,
                          sampler="unipc", fps=16)


def _embeddings():
    from stages.embeddings import PromptEmbeddings

    generator = torch.Generator().manual_seed(11)
    return PromptEmbeddings(torch.randn(9, 64, generator=generator), torch.randn(5, 64, generator=generator))


def _denoise(stage) -> np.ndarray:
    return stage.run(_params(), _embeddings()).numpy()


CACHE_STEPS = 6
IDENTITY = [1.0, 0.0]
# Every cache kind "off" (must be the uncached run bit for bit) and set to reuse work on this model (2 blocks).
CACHES_OFF = {
    "fbcache": {"kind": "fbcache", "threshold": 0.0},
    "dbcache": {"kind": "dbcache", "threshold": 0.0, "first_blocks": 1, "warmup_steps": 0},
    "teacache": {"kind": "teacache", "threshold": 0.0, "coefficients": IDENTITY},
    "magcache": {"kind": "magcache", "threshold": 0.0, "ratios": [[1.0] * CACHE_STEPS]},
    "easycache": {"kind": "easycache", "threshold": 0.0, "ret_steps": 2},
    "meancache": {"kind": "meancache", "fresh_steps": CACHE_STEPS},
    "blockdance": {"kind": "blockdance", "boundary_block": 0, "group_size": 1},
    "pab": {"kind": "pab", "self_range": 1, "cross_range": 1},
    "taylorseer": {"kind": "taylorseer", "interval": 1},
}
CACHES_ON = {
    "fbcache": {"kind": "fbcache", "threshold": 1.0},
    "dbcache": {"kind": "dbcache", "threshold": 1.0, "first_blocks": 1, "warmup_steps": 1},
    "teacache": {"kind": "teacache", "threshold": 5.0, "coefficients": IDENTITY},
    "magcache": {"kind": "magcache", "threshold": 1.0, "retention_ratio": 0.2, "ratios": [[0.95] * CACHE_STEPS]},
    "easycache": {"kind": "easycache", "threshold": 1.0, "ret_steps": 2},
    "meancache": {"kind": "meancache", "fresh_steps": 3},
    "blockdance": {"kind": "blockdance", "boundary_block": 0, "group_size": 2, "start_fraction": 0.0,
                   "end_fraction": 1.0, "warmup": 1, "cooldown": 1},
    "pab": {"kind": "pab", "self_range": 2, "cross_range": 2, "warmup": 1, "cooldown": 1},
    "taylorseer": {"kind": "taylorseer", "interval": 2, "warmup_steps": 1},
}


def _cached(stage) -> dict[str, tuple[np.ndarray, dict]]:
    """Uncached and every kind off and on, at CACHE_STEPS steps: (latents, counts)."""
    params = _params().model_copy(update={"num_inference_steps": CACHE_STEPS})
    runs = {"uncached": params} | {
        f"{kind}/{state}": params.model_copy(update={"cache": _spec(spec)})
        for state, table in (("off", CACHES_OFF), ("on", CACHES_ON)) for kind, spec in table.items()}
    out = {}
    for name, run in runs.items():
        job = stage.run_steps(stage.start(run, _embeddings()))
        out[name] = (job.latents.numpy(), job.cache.stats.as_dict() if job.cache is not None else {})
    return out


def _spec(cache: dict):
    from stages.params import GenerationParams

    return GenerationParams.model_validate({"prompt": "p", "cache": cache}).cache


def _all_layouts(rank: int, world: int) -> dict[str, np.ndarray]:
    """On every rank: build each layout's mesh over its first ranks and denoise with it."""
    torch.set_num_threads(1)
    results = {}
    for name, layout in LAYOUTS.items():
        mesh = ParallelMesh.build(layout, ranks=range(layout.world_size))
        if mesh is not None:
            stage = _stage(mesh)
            results[name] = _denoise(stage)
            if name != "ring3":
                results[name + "/cache"] = _cached(stage)
    return results


@pytest.fixture(scope="module")
def parallel_results() -> list[dict[str, np.ndarray]]:
    return run_local(_all_layouts, WORLD, backend="gloo", timeout_s=300)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return _denoise(_stage())


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_rank(name: str, parallel_results, reference) -> None:
    layout = LAYOUTS[name]
    outputs = [parallel_results[rank][name] for rank in range(layout.world_size)]
    for rank, latents in enumerate(outputs):
        # Every rank ends with the full, identical latents (replicated sampler state).
        np.testing.assert_array_equal(latents, outputs[0], err_msg=f"{name}: rank {rank} differs from rank 0")
    diff = float(np.abs(outputs[0] - reference).max())
    assert diff <= TOLERANCE, f"{name}: max |parallel - single rank| = {diff:.3g} > {TOLERANCE}"
    # The run moved the latents far from the noise, so agreement is not trivial.
    assert float(np.abs(reference).max()) > 0.5


def test_ranks_outside_a_layout_get_no_mesh(parallel_results) -> None:
    assert {k for k in parallel_results[3] if "/" not in k} == {"ulysses2xring2", "cfg2xulysses2", "cfg2xring2"}


@pytest.fixture(scope="module")
def cached_reference() -> dict[str, tuple[np.ndarray, dict]]:
    return _cached(_stage())


@pytest.mark.parametrize("kind", list(CACHES_OFF))
@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "ring3"])
def test_every_cache_under_every_layout(name: str, kind: str, parallel_results, cached_reference) -> None:
    """Off is the uncached run of the layout bit for bit; on, every rank ends with the same latents and the
    ranks sharing a branch take the same decisions (without CFG parallel: the single rank's, within the
    parallel tolerance of its latents). Under CFG parallel each half decides on its own branch, as the
    reference methods keep per-branch state, so its decisions may differ from the batched single rank's."""
    layout = LAYOUTS[name]
    per_rank = [parallel_results[rank][name + "/cache"] for rank in range(layout.world_size)]
    for rank, results in enumerate(per_rank):
        np.testing.assert_array_equal(results[kind + "/off"][0], results["uncached"][0],
                                      err_msg=f"{name}: {kind} off differs from uncached on rank {rank}")
        np.testing.assert_array_equal(results[kind + "/on"][0], per_rank[0][kind + "/on"][0],
                                      err_msg=f"{name}: {kind} on: rank {rank} ends elsewhere than rank 0")
    assert sum(v for k, v in cached_reference[kind + "/on"][1].items() if k.endswith("_reused")) > 0, \
        "the setting must make the single rank reuse something"

    def decisions(stats: dict) -> dict:
        return {k: v for k, v in stats.items() if k != "peak_extra_bytes"}

    halves, sp = layout.cfg_degree, layout.sp_degree  # rank = cfg_index * sp + index in the branch's group
    for rank, results in enumerate(per_rank):
        same_branch = per_rank[(rank // sp) * sp]
        assert decisions(results[kind + "/on"][1]) == decisions(same_branch[kind + "/on"][1]), \
            f"{name}: rank {rank} decided otherwise than the ranks of its branch"
    if halves == 1:
        ref_latents, ref_stats = cached_reference[kind + "/on"]
        assert decisions(per_rank[0][kind + "/on"][1]) == decisions(ref_stats)
        diff = float(np.abs(per_rank[0][kind + "/on"][0] - ref_latents).max())
        assert diff <= TOLERANCE, f"{name}: {kind} cached latents differ from one rank's by {diff:.3g}"


# ---- layout checks (no processes) -----------------------------------------------------------

def test_layout_product_must_equal_world_size() -> None:
    with pytest.raises(LayoutError, match=r"= 4 ranks, but there are 2 \(dit.world_size\).*"
                                          r"e\.g\. cfg_degree=2 ring_degree=1 ulysses_degree=1"):
        ParallelLayout(cfg_degree=2, ulysses_degree=2).validate(world_size=2, num_heads=12, guided=True)


def test_ulysses_degree_must_divide_heads() -> None:
    with pytest.raises(LayoutError, match=r"ulysses_degree 5 does not divide the model's 12 attention heads "
                                          r"\(valid Ulysses degrees: 1, 2, 3, 4, 6, 12\)"):
        ParallelLayout(ulysses_degree=5).validate(world_size=5, num_heads=12, guided=True)


def test_cfg_parallel_needs_guidance() -> None:
    with pytest.raises(LayoutError, match="cfg_degree 2 needs classifier-free guidance.*use cfg_degree 1"):
        ParallelLayout(cfg_degree=2).validate(world_size=2, num_heads=12, guided=False)


def test_degrees_must_be_positive_and_cfg_at_most_two() -> None:
    with pytest.raises(LayoutError, match="ring_degree must be at least 1, got 0"):
        ParallelLayout(ring_degree=0).validate(world_size=1, num_heads=12, guided=True)
    with pytest.raises(LayoutError, match="cfg_degree must be 1 or 2"):
        ParallelLayout(cfg_degree=4).validate(world_size=4, num_heads=12, guided=True)


@pytest.mark.parametrize("world, heads, guided, expected", [
    (1, 12, True, ParallelLayout()),
    (2, 12, True, ParallelLayout(cfg_degree=2)),
    (2, 12, False, ParallelLayout(ulysses_degree=2)),
    (8, 12, True, ParallelLayout(cfg_degree=2, ulysses_degree=4)),
    (16, 12, True, ParallelLayout(cfg_degree=2, ring_degree=2, ulysses_degree=4)),
    (5, 12, True, ParallelLayout(ring_degree=5)),
    (64, 40, True, ParallelLayout(cfg_degree=2, ring_degree=4, ulysses_degree=8)),
])
def test_auto_layout_is_valid_and_prefers_cfg_then_ulysses(world: int, heads: int, guided: bool,
                                                           expected: ParallelLayout) -> None:
    layout = auto_layout(world, heads, guided)
    assert layout == expected
    layout.validate(world, heads, guided)


# ---- kernels (no processes) -------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_log_sum_exp_merge_of_key_blocks_equals_full_attention(dtype: torch.dtype, tol: float) -> None:
    """What one ring rank computes: attention over key blocks merged by log-sum-exp = attention over all keys."""
    from parallel.attention import attention_with_lse, merge_lse

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 16, generator=generator).to(dtype) for n in (11, 13, 13))
    full = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v)))
    out, lse = attention_with_lse(q, k[:, :5], v[:, :5])
    out = out.float()
    for start, stop in ((5, 9), (9, 13)):
        out, lse = merge_lse(out, lse, *attention_with_lse(q, k[:, start:stop], v[:, start:stop]))
    assert (out - full.transpose(1, 2)).abs().max() < tol
    scores = torch.einsum("blhd,bmhd->bhlm", q.float(), k.float()) / 4.0
    assert (lse - torch.logsumexp(scores, -1).transpose(1, 2)).abs().max() < tol * 10
