"""End to end: our Pipeline vs diffusers' WanPipeline on the same random checkpoint.

diffusers loads the checkpoint we write in its own layout (so the layout writer is checked too),
encodes the prompts with its own tokenizer/text-encoder path and runs Wan's FlowUniPC schedule
(diffusers' UniPC given Wan's sigmas). Both start from the same latents.
Tolerances: measured latents 1.3e-5 (2.1) / 8.8e-6 (2.2) and pixels 2.8e-6 / 1.9e-6 (our sinusoid/RoPE are float64 as in Wan,
diffusers' are float32); asserted 2e-4 on latents and pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline

from models.wan.config import WAN_DEFAULT_NEGATIVE_PROMPT
from models.wan.default_model import write_random_checkpoint
from stages.denoise import initial_noise
from stages.pipeline import Pipeline
from stages.samplers import unipc_sigmas

LATENT_ATOL = 2e-4
PIXEL_ATOL = 2e-4
PROMPT = "a red circle moving left on a white background"


class WanFlowUniPC(UniPCMultistepScheduler):
    """diffusers' UniPC on Wan's schedule: linspace(0.999, 0) shifted, timesteps truncated to int."""

    wan_shift: float = 5.0

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, **kwargs) -> None:  # noqa: ANN001
        super().set_timesteps(sigmas=unipc_sigmas(num_inference_steps, self.wan_shift), device=device)


def _reference_pipeline(root: Path, shift: float) -> WanPipeline:
    scheduler = WanFlowUniPC(
        solver_order=2, prediction_type="flow_prediction", predict_x0=True, solver_type="bh2",
        lower_order_final=True, use_flow_sigmas=True, flow_shift=1.0, final_sigmas_type="zero",
    )
    scheduler.wan_shift = shift
    return WanPipeline.from_pretrained(str(root), scheduler=scheduler, dtype=torch.float32)


@pytest.fixture(scope="module", params=[1, 2], ids=["wan2.1", "wan2.2-two-experts"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp(f"wan-e2e-{request.param}")
    write_random_checkpoint(root, num_experts=request.param, layout="diffusers", seed=7)
    return root, request.param


@pytest.mark.slow
def test_pipeline_matches_diffusers_wanpipeline(checkpoint: tuple[Path, int]) -> None:
    root, experts = checkpoint
    shift, steps = 5.0, 6  # t = 999 961 909 | 833 714 500: both experts run when there are two
    params = dict(prompt=PROMPT, height=32, width=48, num_frames=9, num_inference_steps=steps,
                  guidance_scale=4.0, guidance_scale_2=3.0, shift=shift, seed=3, sampler="unipc")
    ours = Pipeline.from_pretrained(root)
    resolved = ours.resolve(params)
    noise = initial_noise(resolved, ours.model.latent)
    result = ours.generate(resolved)
    assert torch.equal(result.latents, ours.denoise_stage.run(resolved, ours.text_stage.run(
        [(PROMPT, WAN_DEFAULT_NEGATIVE_PROMPT)])[0])), "seeded runs must repeat exactly"

    reference = _reference_pipeline(root, shift)
    assert (reference.transformer_2 is not None) == (experts == 2)
    common = dict(prompt=PROMPT, negative_prompt=WAN_DEFAULT_NEGATIVE_PROMPT, height=32, width=48, num_frames=9,
                  num_inference_steps=steps, guidance_scale=4.0, max_sequence_length=ours.model.text_len,
                  latents=noise[None].clone())
    if experts == 2:
        common["guidance_scale_2"] = 3.0
    ref_latents = reference(**common, output_type="latent").frames[0]
    latent_err = (ref_latents - result.latents).abs().max().item()
    assert latent_err < LATENT_ATOL, f"latents differ by {latent_err:.2e} (|latents| max {ref_latents.abs().max():.2f})"

    ref_video = reference(**common, output_type="np").frames[0]  # (T, H, W, 3) in [0, 1]
    ours_video = (ours.decode_stage.vae.decode(result.latents[None])[0].permute(1, 2, 3, 0) / 2 + 0.5).clamp(0, 1)
    pixel_err = np.abs(ref_video - ours_video.numpy()).max()
    assert pixel_err < PIXEL_ATOL, f"pixels differ by {pixel_err:.2e}"
    assert result.frames.shape == (9, 32, 48, 3) and result.frames.dtype == np.uint8
    assert np.abs(result.frames.astype(np.int16) - np.round(ref_video * 255)).max() <= 1


def test_original_and_diffusers_layouts_generate_the_same(tmp_path: Path) -> None:
    write_random_checkpoint(tmp_path / "orig", layout="original", seed=11)
    write_random_checkpoint(tmp_path / "diff", layout="diffusers", seed=11)
    params = dict(prompt=PROMPT, height=32, width=32, num_frames=5, num_inference_steps=3, seed=5)
    a = Pipeline.from_pretrained(tmp_path / "orig").generate(params)
    b = Pipeline.from_pretrained(tmp_path / "diff").generate(params)
    assert torch.equal(a.latents, b.latents) and np.array_equal(a.frames, b.frames)
    assert set(a.timings) == {"text_encode", "denoise", "decode", "total"}


def test_guidance_one_skips_the_unconditional_branch(tmp_path: Path) -> None:
    write_random_checkpoint(tmp_path, seed=2)
    pipe = Pipeline.from_pretrained(tmp_path)
    calls: list[int] = []
    model = pipe.denoise_stage.experts[0]
    begin = model.begin
    model.begin = lambda latents, *args: calls.append(latents.shape[0]) or begin(latents, *args)
    try:
        pipe.generate(dict(prompt=PROMPT, height=32, width=32, num_frames=1, num_inference_steps=2,
                           guidance_scale=1.0, seed=0))
    finally:
        del model.begin
    assert calls == [1, 1], "guidance 1 must run the conditional branch only"
