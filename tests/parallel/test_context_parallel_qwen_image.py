"""Qwen-Image under context and CFG parallelism equals the single-rank result (CPU, gloo, 4 spawned processes),
and its VAE's strip-parallel decode equals the single-rank decode.

`stages.denoise.DenoiseStage` / `BlockRunner` shard the image tokens, keep the text tokens replicated and run a
tiny random-weight `QwenImageTransformer` for a few flowmatch-euler steps with true CFG, the per-token renorm and
the terminal-stretched schedule (Qwen-Image's description). Each stream applies its own RoPE rows (text rows to
the text, the shard's image rows to the image), so a wrong slice of either shows. The image is 80 x 112 pixels, a
5 x 7 grid of 35 image tokens, which no sequence-parallel degree here divides: every layout pads the image shards
and must drop the padded keys. The positive prompt has 7 text tokens and the negative 4, so when both branches run
in one batch (no CFG parallelism) the negative's text is padded and masked; with cfg 2 each half runs one branch
unpadded. One spawn of 4 ranks runs every layout (ranks outside a smaller layout only take part in creating its
groups) and the VAE strip decodes over 3 and 4 ranks; the single-rank references run in this process.

Tolerance: fp32 latents (values up to 4.9) within 2e-5 absolute. The parallel paths sum the same terms in another
order (log-sum-exp merges, per-shard GEMMs, the masked text block by the definition, one branch per CFG half
instead of a padded batch of two): measured 0 (ulysses2) to 3.5e-6; a missing key mask, a wrong RoPE slice or a
wrong head slice gives differences of order 0.1-1 (the RoPE and mask cases are checked below). VAE strips: 1e-5,
as for the Wan VAE (float summation order; measured 1.4e-6).
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
    "cfg2": ParallelLayout(cfg_degree=2),
    "cfg2xulysses2": ParallelLayout(cfg_degree=2, ulysses_degree=2),
    "cfg2xring2": ParallelLayout(cfg_degree=2, ring_degree=2),
}
WORLD = 4
TOLERANCE = 2e-5
VAE_ATOL = 1e-5
HEIGHT, WIDTH = 80, 112  # latent 10 x 14 -> a 5 x 7 grid = 35 image tokens
TEXT_LENS = (7, 4)  # positive, negative
STEPS = 3
VAE_LATENT = (1, 4, 7, 6)  # 7 latent rows: strips 3 + 2 + 2 and 2 + 2 + 2 + 1


def _config():
    from models.qwen_image.config import QwenImageDiTConfig

    # 4 heads so Ulysses 2 keeps two heads per rank and a wrong head order shows; 4 latent channels.
    return QwenImageDiTConfig(num_layers=2, num_attention_heads=4, attention_head_dim=16, joint_attention_dim=24,
                              in_channels=16, out_channels=4, axes_dims_rope=(8, 4, 4))


def _description():
    from models.qwen_image.config import QwenImagePreset
    from models.qwen_image.family import description

    return description(QwenImagePreset("cp-test", _config()))


def _model():
    from models.qwen_image.transformer import QwenImageTransformer
    from models.random_init import randomize_parameters

    return randomize_parameters(QwenImageTransformer(_config()).eval(), seed=5)


def _stage(model, mesh: ParallelMesh | None = None):
    from stages.denoise import DenoiseStage

    model_description = _description()
    return DenoiseStage([model], mesh=mesh, guidance="cfg", cfg_form=model_description.cfg_form,
                        cfg_renorm=model_description.cfg_renorm, shift_terminal=model_description.shift_terminal)


def _job(stage):
    """Qwen-Image's defaults for this size: true CFG 4.0, its dynamic shift, flowmatch-euler to sigma 0.02."""
    from models.conditioning import Conditioning
    from stages.embeddings import PromptEmbeddings
    from stages.params import GenerationParams

    params = GenerationParams(prompt="p", negative_prompt="n", height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                              seed=3).resolve(_description())
    assert params.guided and params.guidance_scale == 4.0
    generator = torch.Generator().manual_seed(11)
    positive, negative = (Conditioning(torch.randn(n, _config().joint_attention_dim, generator=generator))
                          for n in TEXT_LENS)
    return stage.start(params, PromptEmbeddings(positive, negative))


def _denoise(stage) -> np.ndarray:
    return stage.run_steps(_job(stage)).latents.numpy()


def _vae():
    from models.qwen_image.tiny import tiny_vae_config
    from models.qwen_image.vae import QwenImageVAE
    from models.random_init import randomize_parameters

    return randomize_parameters(QwenImageVAE(tiny_vae_config(VAE_LATENT[1])).eval(), seed=0)


def _vae_latents() -> torch.Tensor:
    return torch.randn(VAE_LATENT, generator=torch.Generator().manual_seed(1))


def _all_layouts(rank: int, world: int) -> dict[str, object]:
    """On every rank: build each layout's mesh over its first ranks and denoise with it; then the VAE strips."""
    import torch.distributed as dist

    from parallel.vae_decode import decode_patch_parallel

    torch.set_num_threads(1)
    results: dict[str, object] = {}
    model = _model()
    for name, layout in LAYOUTS.items():
        mesh = ParallelMesh.build(layout, ranks=range(layout.world_size))
        if mesh is not None:
            results[name] = _denoise(_stage(model, mesh))
    vae, z = _vae(), _vae_latents()
    three = dist.new_group(ranks=[0, 1, 2])
    if rank < 3:
        results["vae3"] = decode_patch_parallel(vae, z, group=three).numpy()
    results["vae4"] = decode_patch_parallel(vae, z).numpy()
    return results


@pytest.fixture(scope="module")
def parallel_results() -> list[dict[str, object]]:
    return run_local(_all_layouts, WORLD, backend="gloo", timeout_s=600)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return _denoise(_stage(_model()))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_qwen_image_layout_matches_single_rank(name: str, parallel_results, reference) -> None:
    layout = LAYOUTS[name]
    outputs = [parallel_results[rank][name] for rank in range(layout.world_size)]
    assert outputs[0].shape == (4, HEIGHT // 8, WIDTH // 8)
    for rank, latents in enumerate(outputs):
        # Every rank ends with the full, identical latents (replicated sampler state).
        np.testing.assert_array_equal(latents, outputs[0], err_msg=f"{name}: rank {rank} differs from rank 0")
    diff = float(np.abs(outputs[0] - reference).max())
    assert diff <= TOLERANCE, f"{name}: max |parallel - single rank| = {diff:.3g} > {TOLERANCE}"


@pytest.mark.slow
def test_vae_strips_reassemble_to_the_single_rank_decode(parallel_results) -> None:
    single = _vae().decode(_vae_latents())
    assert single.shape == (1, 3, 56, 48) and (single.abs() < 1).float().mean() > 0.5
    for key, ranks in (("vae3", 3), ("vae4", 4)):
        for rank in range(ranks):
            got = torch.from_numpy(parallel_results[rank][key])
            torch.testing.assert_close(got, single, atol=VAE_ATOL, rtol=0, msg=lambda m: f"{key} rank {rank}: {m}")


def test_the_check_is_sensitive_to_rope_rows_and_masks(reference) -> None:
    """The agreement above is not trivial: the steps move the noise far more than the tolerance, and image RoPE
    rows off by one token, or the negative's padded text rows left unmasked, change the result by far more."""
    from models.qwen_image.transformer import QwenImageTransformer

    stage = _stage(_model())
    assert float(np.abs(reference - _job(stage).latents.numpy()).max()) > 0.5

    model = _model()
    tables = QwenImageTransformer.rope

    def shifted_rope(self, text_len, grid, device=None):  # image rows rolled by one token
        cos, sin = tables(self, text_len, grid, device)
        return tuple(torch.cat([t[:text_len], t[text_len:].roll(1, dims=0)]) for t in (cos, sin))

    model.rope = shifted_rope.__get__(model)
    assert float(np.abs(_denoise(_stage(model)) - reference).max()) > 100 * TOLERANCE

    model = _model()
    prepare = model.prepare
    model.prepare = lambda latents, t, context, mask=None: prepare(latents, t, context, None)
    assert float(np.abs(_denoise(_stage(model)) - reference).max()) > 100 * TOLERANCE
