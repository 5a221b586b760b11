"""Z-Image under context parallelism equals the single-rank result (CPU, gloo, 4 spawned processes).

`stages.denoise.DenoiseStage` / `BlockRunner` run a tiny random-weight `ZImageTransformer` (noise refiners,
main layers; the context refiner in `begin`) for a few flowmatch-euler steps without guidance, as Turbo runs.
One spawn of 4 ranks runs every layout (ranks outside a smaller layout only take part in creating its groups);
the single-rank reference runs in this process with the same seeded weights.

Padding: the image is 80 x 112 pixels, a 5 x 7 grid of 35 image tokens, which the model pads to 64 with its
learned `x_pad_token` (attended like real tokens) and the caption has 7 tokens, padded to 32 with
`cap_pad_token`. So under 2 ranks the second shard holds 3 real tokens and 29 pad tokens, under 4 ranks the
last shard is all pad tokens, and under ring 3 (64 = 3 x 22 - 2) the runner adds 2 zero rows of its own that
the parallel attention must drop while keeping the model's pad tokens. Every rank must see the whole caption
(replicated) and only its shard of the image stream, in every block.

Also true CFG (`CFG_LAYOUTS`) with a prompt and a negative prompt whose captions pad to different lengths.

Tolerance: fp32 latents (values O(1)) within 2e-5 absolute (CFG: `CFG_TOLERANCE`). The parallel paths sum the
same terms in another order (log-sum-exp merges, per-shard GEMMs): measured 0 for ulysses 2, 1.3e-6 for ring 2
and ulysses 2 x ring 2, 1.4e-6 for ring 3; a dropped pad token, a wrong RoPE slice or an attended zero row gives
differences of order 0.1-1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parallel.launch import run_local
from parallel.mesh import ParallelLayout, ParallelMesh

pytestmark = pytest.mark.slow  # 4 spawned gloo ranks

LAYOUTS = {
    "ulysses2": ParallelLayout(ulysses_degree=2),
    "ring2": ParallelLayout(ring_degree=2),
    "ulysses2xring2": ParallelLayout(ring_degree=2, ulysses_degree=2),
    "ring3": ParallelLayout(ring_degree=3),
}
# True CFG as the non-distilled base runs it (cfg_form "cond"), with a prompt of 40 tokens and a negative prompt of 7:
# the captions pad to 64 and 32, so the joint attention masks the shorter one's filler rows on every rank, and each
# branch has its own positions; the batched pair under sequence parallelism, or one branch per CFG half.
CFG_LAYOUTS = {
    "ulysses2": ParallelLayout(ulysses_degree=2),
    "ring2": ParallelLayout(ring_degree=2),
    "cfg2": ParallelLayout(cfg_degree=2),
    "cfg2xring2": ParallelLayout(cfg_degree=2, ring_degree=2),
}
CFG_SCALE, NEGATIVE_LEN, PROMPT_LEN = 2.5, 7, 40
CFG_TOLERANCE = 4e-5
"""The guided velocity (1 + g) v_c - g v_u carries each branch's rounding differences up to 1 + 2g = 6 times: measured
0 (ulysses 2), 5.6e-6 (ring 2), 6.3e-6 (cfg 2: each branch alone, unmasked, against the masked pair of one rank),
7.6e-6 (cfg 2 x ring 2)."""
WORLD = 4
TOLERANCE = 2e-5
HEIGHT, WIDTH = 80, 112  # latent 10 x 14 -> a 5 x 7 grid = 35 image tokens, padded to 64
IMAGE_TOKENS, CAPTION_LEN = 64, 7
STEPS = 3
# TeaCache's (identity polynomial) measured indicator on this model is 0.31 at step 1 -> reused at 0.5, then
# 0.31 + 0.35 -> computed; PAB reuses the noise refiners' self-attention and the main layers' joint attention at
# step 2. (FBCache's first-block change is about 1.0 here, at the top of its threshold range: left out.)
CACHES = {
    "fbcache0": {"kind": "fbcache", "threshold": 0.0},
    "teacache": {"kind": "teacache", "threshold": 0.5, "coefficients": [1.0, 0.0]},
    "pab": {"kind": "pab", "self_range": 2, "cross_range": 2, "warmup": 1, "cooldown": 0},
}


def _config():
    from models.z_image.config import ZImageDiTConfig

    # 4 heads so Ulysses 2 keeps two heads per rank and a wrong head order shows; head_dim 16 = 8 + 4 + 4.
    return ZImageDiTConfig(dim=64, n_heads=4, n_kv_heads=4, n_layers=2, n_refiner_layers=2, cap_feat_dim=24,
                           axes_dims=(8, 4, 4), axes_lens=(256, 32, 32))


def _stage(mesh: ParallelMesh | None = None, guidance: str = "none"):
    from models.random_init import randomize_parameters
    from models.z_image.transformer import ZImageTransformer
    from stages.denoise import DenoiseStage

    model = ZImageTransformer(_config()).eval()
    randomize_parameters(model, seed=5)
    return DenoiseStage([model], mesh=mesh, guidance=guidance, teacache_signals={"default": "modulated_input"},
                        cfg_form="cond" if guidance == "cfg" else "uncond")


def _job(stage, cache: dict | None = None):
    """A Turbo-style job: flowmatch-euler with the static shift 3, one branch."""
    from models.conditioning import Conditioning
    from stages.embeddings import PromptEmbeddings
    from stages.params import ResolvedParams

    params = ResolvedParams(prompt="p", negative_prompt="", height=HEIGHT, width=WIDTH, num_frames=1,
                            num_inference_steps=STEPS, guidance_scale=1.0, guidance_scale_2=1.0, shift=3.0, seed=3,
                            sampler="flowmatch-euler", fps=1, guidance="none", cache=cache)
    generator = torch.Generator().manual_seed(11)
    prompt = Conditioning(torch.randn(CAPTION_LEN, _config().cap_feat_dim, generator=generator))
    return stage.start(params, PromptEmbeddings(prompt, None))


def _denoise(stage) -> np.ndarray:
    return stage.run_steps(_job(stage)).latents.numpy()


def _denoise_cfg(stage) -> np.ndarray:
    from models.conditioning import Conditioning
    from stages.embeddings import PromptEmbeddings
    from stages.params import ResolvedParams

    params = ResolvedParams(prompt="p", negative_prompt="", height=HEIGHT, width=WIDTH, num_frames=1,
                            num_inference_steps=STEPS, guidance_scale=CFG_SCALE, guidance_scale_2=CFG_SCALE, shift=3.0,
                            seed=3, sampler="flowmatch-euler", fps=1, guidance="cfg", cache=None, cfg_form="cond")
    generator = torch.Generator().manual_seed(12)
    prompt, negative = (Conditioning(torch.randn(n, _config().cap_feat_dim, generator=generator))
                        for n in (PROMPT_LEN, NEGATIVE_LEN))
    return stage.run_steps(stage.start(params, PromptEmbeddings(prompt, negative))).latents.numpy()


def _streams_seen(stage) -> list[tuple[str, int, int]]:
    """(block kind, image rows, caption rows) of every block call of one step on this rank."""
    model = stage.experts[0]
    seen: list[tuple[str, int, int]] = []
    run_block = model.run_block

    def spy(block, img, txt, state):  # type: ignore[no-untyped-def]
        seen.append((block.kind, img.shape[1], txt.shape[1]))
        return run_block(block, img, txt, state)

    model.run_block = spy
    try:
        stage.run_steps(_job(stage), max_steps=1)
    finally:
        del model.run_block
    return seen


def _all_layouts(rank: int, world: int) -> dict[str, object]:
    """On every rank: build each layout's mesh over its first ranks and denoise with it."""
    torch.set_num_threads(1)
    results: dict[str, object] = {}
    for name, layout in CFG_LAYOUTS.items():
        mesh = ParallelMesh.build(layout, ranks=range(layout.world_size))
        if mesh is not None:
            results[name + "/cfg"] = _denoise_cfg(_stage(mesh, guidance="cfg"))
    for name, layout in LAYOUTS.items():
        mesh = ParallelMesh.build(layout, ranks=range(layout.world_size))
        if mesh is not None:
            stage = _stage(mesh)
            results[name] = _denoise(stage)
            results[name + "/streams"] = _streams_seen(stage)
            results[name + "/cache"] = {key: (job.latents.numpy(), job.cache.stats.as_dict())
                                        for key, job in ((k, stage.run_steps(_job(stage, spec)))
                                                         for k, spec in CACHES.items())}
    return results


@pytest.fixture(scope="module")
def parallel_results() -> list[dict[str, object]]:
    return run_local(_all_layouts, WORLD, backend="gloo", timeout_s=300)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return _denoise(_stage())


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_z_image_layout_matches_single_rank(name: str, parallel_results, reference) -> None:
    layout = LAYOUTS[name]
    outputs = [parallel_results[rank][name] for rank in range(layout.world_size)]
    assert outputs[0].shape == (16, HEIGHT // 8, WIDTH // 8)
    for rank, latents in enumerate(outputs):
        # Every rank ends with the full, identical latents (replicated sampler state).
        np.testing.assert_array_equal(latents, outputs[0], err_msg=f"{name}: rank {rank} differs from rank 0")
    diff = float(np.abs(outputs[0] - reference).max())
    assert diff <= TOLERANCE, f"{name}: max |parallel - single rank| = {diff:.3g} > {TOLERANCE}"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_caption_replicated_image_sharded(name: str, parallel_results) -> None:
    """Every block on every rank: the whole padded caption, this rank's shard of the padded image stream."""
    layout = LAYOUTS[name]
    shard = -(-IMAGE_TOKENS // layout.sp_degree)
    expected = [("noise", shard, 32)] * 2 + [("main", shard, 32)] * 2
    for rank in range(layout.world_size):
        assert parallel_results[rank][name + "/streams"] == expected, f"{name}: rank {rank}"


@pytest.fixture(scope="module")
def cfg_reference() -> np.ndarray:
    return _denoise_cfg(_stage(guidance="cfg"))


@pytest.mark.parametrize("name", list(CFG_LAYOUTS))
def test_true_cfg_with_captions_of_different_lengths_matches_single_rank(name: str, parallel_results,
                                                                         cfg_reference) -> None:
    layout = CFG_LAYOUTS[name]
    outputs = [parallel_results[rank][name + "/cfg"] for rank in range(layout.world_size)]
    for rank, latents in enumerate(outputs):
        np.testing.assert_array_equal(latents, outputs[0], err_msg=f"{name}: rank {rank} differs from rank 0")
    diff = float(np.abs(outputs[0] - cfg_reference).max())
    assert diff <= CFG_TOLERANCE, f"{name}: max |parallel - single rank| = {diff:.3g} > {CFG_TOLERANCE}"


def test_the_denoising_moves_the_latents(reference) -> None:
    """The agreement above is not trivial: the steps change the noise by far more than the tolerance."""
    noise = _job(_stage()).latents.numpy()
    assert float(np.abs(reference - noise).max()) > 0.5


@pytest.fixture(scope="module")
def cached_reference() -> dict[str, object]:
    stage = _stage()
    return {key: (job.latents.numpy(), job.cache.stats.as_dict())
            for key, job in ((k, stage.run_steps(_job(stage, spec))) for k, spec in CACHES.items())}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_caches_decide_on_every_rank_as_on_one(name: str, parallel_results, cached_reference) -> None:
    """Every rank takes the single rank's decisions: TeaCache's indicator sums run over every rank's image tokens
    (the model's pad tokens included, the runner's zero rows not), PAB's schedule is per attention kind."""
    layout = LAYOUTS[name]
    for kind in CACHES:
        ref_latents, ref_stats = cached_reference[kind]
        if kind != "fbcache0":
            reused = ref_stats["forwards_reused"] + ref_stats["attention_reused"]
            assert reused > 0, f"{kind}: the setting must make the single rank reuse something"
        for rank in range(layout.world_size):
            latents, stats = parallel_results[rank][name + "/cache"][kind]
            drop = ("peak_extra_bytes",)
            assert {k: v for k, v in stats.items() if k not in drop} == {
                k: v for k, v in ref_stats.items() if k not in drop}, f"{name} {kind}: rank {rank} decided otherwise"
            diff = float(np.abs(latents - ref_latents).max())
            assert diff <= TOLERANCE, f"{name} {kind}: rank {rank} latents differ by {diff:.3g}"
