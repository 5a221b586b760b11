"""FLUX.2 under context parallelism equals the single-rank result (CPU, gloo, 4 spawned processes).

`stages.denoise.DenoiseStage` / `BlockRunner` shard the image tokens, keep the text tokens replicated and run a
tiny random-weight `Flux2Transformer` (double- and single-stream blocks, the shared modulations) for a few
flowmatch-euler steps with one branch and no guidance input, as klein runs, with klein's empirical shift. One
spawn of 4 ranks runs every layout (ranks outside a smaller layout only take part in creating its groups); the
single-rank reference runs in this process with the same seeded weights.

The image is 80 x 112 pixels, a 5 x 7 grid of 35 image tokens, with 7 text tokens: no world size here divides
either, so every layout pads the image shards and must drop the padded keys, and each rank rotates its image
rows with the RoPE rows of their global positions (4 axes: text (0, 0, 0, l), image (0, row, col, 0)). The text
is replicated in full on every rank, in every block.

Tolerance: fp32 latents (values up to about 6) within 2e-5 absolute. The parallel paths sum the same terms in
another order (log-sum-exp merges, per-shard GEMMs): measured 1.2e-6 (ulysses 2, ring 2, ulysses 2 x ring 2) and
1.4e-6 (ring 3); a missing key mask, a wrong RoPE slice or a wrong head slice gives differences of order 0.1-1.
Spawning 4 ranks takes tens of seconds on 2 cores: the module is marked slow.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parallel.launch import run_local
from parallel.mesh import ParallelLayout, ParallelMesh

pytestmark = pytest.mark.slow

LAYOUTS = {
    "ulysses2": ParallelLayout(ulysses_degree=2),
    "ring2": ParallelLayout(ring_degree=2),
    "ulysses2xring2": ParallelLayout(ring_degree=2, ulysses_degree=2),
    "ring3": ParallelLayout(ring_degree=3),
}
WORLD = 4
TOLERANCE = 2e-5
HEIGHT, WIDTH = 80, 112  # latent 5 x 7 at 1/16 -> 35 image tokens
IMAGE_TOKENS, TEXT_LEN = 35, 7
STEPS = 3
# (spec, its measured indicator trace on this model): FBCache's first-block changes 1.25, 1.56 (above its largest
# threshold, 1: run at 0 it is the uncached run with the indicator measured); TeaCache's (identity polynomial) 0.23
# at step 1 -> reused at 0.5, then 0.23 + 0.37 -> computed; TaylorSeer forecasts every block at step 2.
CACHES = {
    "fbcache0": {"kind": "fbcache", "threshold": 0.0},
    "teacache": {"kind": "teacache", "threshold": 0.5, "coefficients": [1.0, 0.0]},
    "taylorseer": {"kind": "taylorseer", "interval": 2, "warmup_steps": 2},
}


def _config():
    from models.flux2.config import Flux2DiTConfig

    # 4 heads so Ulysses 2 keeps two heads per rank and a wrong head order shows; head_dim 16 = 4 x 4 RoPE axes.
    return Flux2DiTConfig(hidden_size=64, num_heads=4, num_double_blocks=2, num_single_blocks=2, context_dim=24,
                          axes_dims_rope=(4, 4, 4, 4))


def _stage(mesh: ParallelMesh | None = None):
    from models.flux2.transformer import Flux2Transformer
    from models.random_init import randomize_parameters
    from stages.denoise import DenoiseStage

    model = Flux2Transformer(_config()).eval()
    randomize_parameters(model, seed=5)
    return DenoiseStage([model], mesh=mesh, guidance="none", teacache_signals={"default": "modulated_input"})


def _job(stage, cache: dict | None = None):
    """A klein-style job: flowmatch-euler, one branch, the empirical shift for this size and step count."""
    from models.conditioning import Conditioning
    from models.family import EmpiricalShift
    from stages.embeddings import PromptEmbeddings
    from stages.params import ResolvedParams

    params = ResolvedParams(prompt="p", negative_prompt="", height=HEIGHT, width=WIDTH, num_frames=1,
                            num_inference_steps=STEPS, guidance_scale=1.0, guidance_scale_2=1.0,
                            shift=EmpiricalShift().shift(IMAGE_TOKENS, STEPS), seed=3, sampler="flowmatch-euler",
                            fps=1, guidance="none", cache=cache)
    generator = torch.Generator().manual_seed(11)
    prompt = Conditioning(torch.randn(TEXT_LEN, _config().context_dim, generator=generator))
    return stage.start(params, PromptEmbeddings(prompt, None))


def _denoise(stage) -> np.ndarray:
    return stage.run_steps(_job(stage)).latents.numpy()


def _streams_seen(stage) -> list[tuple[str, int, int, int]]:
    """(block kind, image rows, text rows, RoPE rows) of every block call of one step on this rank."""
    from models.flux2.transformer import DoubleStreamBlock

    model = stage.experts[0]
    seen: list[tuple[str, int, int, int]] = []
    run_block = model.run_block

    def spy(block, img, txt, state):  # type: ignore[no-untyped-def]
        kind = "double" if isinstance(block, DoubleStreamBlock) else "single"
        seen.append((kind, img.shape[1], txt.shape[1], state.rope[0].shape[0]))
        return run_block(block, img, txt, state)

    model.run_block = spy
    try:
        stage.run_steps(_job(stage), max_steps=1)
    finally:
        del model.run_block
    return seen


def _cached(stage) -> dict[str, tuple[np.ndarray, dict, list]]:
    """Each of CACHES: latents, the counts and the per-step indicator trace."""
    out = {}
    for key, spec in CACHES.items():
        job = stage.run_steps(_job(stage, spec))
        trace = {"fbcache": lambda: job.cache.changes, "teacache": lambda: [t["delta"] for t in job.cache.trace]
                 }.get(spec["kind"], list)()
        out[key] = (job.latents.numpy(), job.cache.stats.as_dict(), np.asarray(trace, dtype=float).tolist())
    return out


def _all_layouts(rank: int, world: int) -> dict[str, object]:
    """On every rank: build each layout's mesh over its first ranks and denoise with it."""
    torch.set_num_threads(1)
    results: dict[str, object] = {}
    for name, layout in LAYOUTS.items():
        mesh = ParallelMesh.build(layout, ranks=range(layout.world_size))
        if mesh is not None:
            stage = _stage(mesh)
            results[name] = _denoise(stage)
            results[name + "/streams"] = _streams_seen(stage)
            results[name + "/cache"] = _cached(stage)
    return results


@pytest.fixture(scope="module")
def parallel_results() -> list[dict[str, object]]:
    return run_local(_all_layouts, WORLD, backend="gloo", timeout_s=300)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return _denoise(_stage())


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_flux2_layout_matches_single_rank(name: str, parallel_results, reference) -> None:
    layout = LAYOUTS[name]
    outputs = [parallel_results[rank][name] for rank in range(layout.world_size)]
    assert outputs[0].shape == (128, HEIGHT // 16, WIDTH // 16)
    for rank, latents in enumerate(outputs):
        # Every rank ends with the full, identical latents (replicated sampler state).
        np.testing.assert_array_equal(latents, outputs[0], err_msg=f"{name}: rank {rank} differs from rank 0")
    diff = float(np.abs(outputs[0] - reference).max())
    assert diff <= TOLERANCE, f"{name}: max |parallel - single rank| = {diff:.3g} > {TOLERANCE}"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_text_replicated_image_sharded(name: str, parallel_results) -> None:
    """Every block on every rank: the whole text, this rank's (padded) shard of the image tokens, and RoPE rows
    for exactly those (text rows first)."""
    layout = LAYOUTS[name]
    shard = -(-IMAGE_TOKENS // layout.sp_degree)
    expected = [("double", shard, TEXT_LEN, TEXT_LEN + shard)] * 2 + [("single", shard, TEXT_LEN, TEXT_LEN + shard)] * 2
    for rank in range(layout.world_size):
        assert parallel_results[rank][name + "/streams"] == expected, f"{name}: rank {rank}"


def test_the_denoising_moves_the_latents(reference) -> None:
    """The agreement above is not trivial: the steps change the noise by far more than the tolerance."""
    noise = _job(_stage()).latents.numpy()
    assert float(np.abs(reference - noise).max()) > 0.5


@pytest.fixture(scope="module")
def cached_reference() -> dict[str, tuple[np.ndarray, dict, list]]:
    return _cached(_stage())


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_caches_decide_on_every_rank_as_on_one(name: str, parallel_results, cached_reference) -> None:
    """Threshold 0 is the uncached run; above it every rank measures the same indicator as one rank (its sums run
    over every rank's real image tokens) and takes the single rank's decisions."""
    layout = LAYOUTS[name]
    for kind in CACHES:
        ref_latents, ref_stats, ref_trace = cached_reference[kind]
        if kind != "fbcache0":
            assert ref_stats["forwards_reused"] + ref_stats["blocks_reused"] > 0, \
                f"{kind}: the setting must make the single rank reuse"
        for rank in range(layout.world_size):
            latents, stats, trace = parallel_results[rank][name + "/cache"][kind]
            drop = ("peak_extra_bytes",)
            assert {k: v for k, v in stats.items() if k not in drop} == {
                k: v for k, v in ref_stats.items() if k not in drop}, f"{name} {kind}: rank {rank} decided otherwise"
            np.testing.assert_allclose(trace[1:], ref_trace[1:], rtol=1e-5, err_msg=f"{name} {kind}: rank {rank}")
            diff = float(np.abs(latents - ref_latents).max())
            assert diff <= TOLERANCE, f"{name} {kind}: rank {rank} latents differ by {diff:.3g}"
