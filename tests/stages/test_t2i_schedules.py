"""The flow-match schedules of Qwen-Image (dynamic shift with a terminal stretch), FLUX.2 (the empirical mu that
depends on the step count) and Z-Image (a static shift), and the true-CFG combinations of Qwen-Image (per-token
renormalisation) and Z-Image (conditional base), each against diffusers 0.42.1 computing the same thing.

The schedules run the same float32 numpy operations as diffusers' FlowMatchEulerDiscreteScheduler, except the
static shift, which diffusers evaluates as s*x/(1+(s-1)x) and we as s/(s+1/x-1): equal up to float32 rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from models.family import DynamicShift, EmpiricalShift
from stages.denoise import combine_guidance, per_token_norms
from stages.samplers import make_sampler

SCHEDULE_ATOL = 1e-6  # the same float32 operations: measured 0; one last-bit libm difference allowed
STATIC_SHIFT_ATOL = 2e-7  # s*x/(1+(s-1)x) vs s/(s+1/x-1) in float32: a few ulps of 1
QWEN_SHIFT = DynamicShift(base_shift=0.5, max_shift=0.9, base_seq_len=256, max_seq_len=8192)


def _dynamic(num_steps: int, mu: float, **config: object) -> FlowMatchEulerDiscreteScheduler:
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential", **config)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return sched


@pytest.mark.parametrize("num_steps", [2, 4, 20, 50])
@pytest.mark.parametrize("tokens", [16, 4096, 6889])
def test_qwen_image_schedule_with_terminal_stretch(tokens: int, num_steps: int) -> None:
    mu = calculate_shift(tokens, 256, 8192, 0.5, 0.9)
    assert QWEN_SHIFT.mu(tokens) == pytest.approx(mu, abs=1e-12)
    ref = _dynamic(num_steps, mu, base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
                   shift_terminal=0.02)
    ours = make_sampler("flowmatch-euler", num_steps, QWEN_SHIFT.shift(tokens), shift_terminal=0.02)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=0, atol=SCHEDULE_ATOL)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=SCHEDULE_ATOL * 1000)
    assert float(ours.sigmas[0]) == pytest.approx(1.0) and float(ours.sigmas[-2]) == pytest.approx(0.02, abs=1e-6)


@pytest.mark.parametrize("num_steps", [1, 4, 28, 50, 200])
@pytest.mark.parametrize("tokens", [16, 1024, 4096, 4301, 16384])
def test_flux2_empirical_shift(tokens: int, num_steps: int) -> None:
    mu = compute_empirical_mu(tokens, num_steps)
    assert EmpiricalShift().mu(tokens, num_steps) == mu
    ref = _dynamic(num_steps, mu)
    ours = make_sampler("flowmatch-euler", num_steps, EmpiricalShift().shift(tokens, num_steps))
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=0, atol=SCHEDULE_ATOL)


def test_flux2_known_schedule_1024_4_steps() -> None:
    """1024x1024 is 4096 tokens of 16x16 pixels: mu 2.29118, sigmas [1, 0.967384, 0.908144, 0.7672, 0]."""
    assert EmpiricalShift().mu(4096, 4) == pytest.approx(2.29118, abs=1e-5)
    sigmas = make_sampler("flowmatch-euler", 4, EmpiricalShift().shift(4096, 4)).sigmas
    torch.testing.assert_close(sigmas, torch.tensor([1, 0.967384, 0.908144, 0.7672, 0]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_steps", [1, 8, 50])
def test_z_image_static_shift(num_steps: int) -> None:
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps).tolist())
    ours = make_sampler("flowmatch-euler", num_steps, 3.0)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=0, atol=STATIC_SHIFT_ATOL)


def test_one_step_terminal_schedule_is_defined() -> None:
    """diffusers divides by zero here (its one sigma is 1); ours keeps [1, 0] instead of NaN."""
    assert make_sampler("flowmatch-euler", 1, 2.0, shift_terminal=0.02).sigmas.tolist() == [1.0, 0.0]


def test_terminal_stretch_only_on_flowmatch_and_in_range() -> None:
    with pytest.raises(ValueError, match="flowmatch-euler"):
        make_sampler("unipc", 10, 5.0, shift_terminal=0.02)
    with pytest.raises(ValueError, match=r"shift_terminal must be in \(0, 1\)"):
        make_sampler("flowmatch-euler", 10, 1.0, shift_terminal=1.5)


def _packed(v: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> (H/2 * W/2, C * 4): FLUX.1 / Qwen-Image packing, features (c, ph, pw)."""
    c, h, w = v.shape
    return v.reshape(c, h // 2, 2, w // 2, 2).permute(1, 3, 0, 2, 4).reshape(h // 2 * w // 2, c * 4)


def test_qwen_image_renormalised_cfg_matches_the_pipeline_on_packed_latents() -> None:
    """QwenImagePipeline: comb = neg + g (pos - neg); comb * ||pos|| / ||comb|| over each packed token's values."""
    gen = torch.Generator().manual_seed(0)
    v_c, v_u = torch.randn(2, 16, 6, 8, generator=gen)
    ours = combine_guidance(v_c, v_u, 4.0, "uncond", (1, 2, 2))
    pc, pu = _packed(v_c), _packed(v_u)
    comb = pu + 4.0 * (pc - pu)
    ref = comb * (torch.norm(pc, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    torch.testing.assert_close(_packed(ours), ref, rtol=1e-6, atol=1e-6)  # the norm sums in another order
    assert torch.allclose(per_token_norms(ours, (1, 2, 2)), per_token_norms(v_c, (1, 2, 2)), atol=1e-5)


def test_cfg_forms() -> None:
    v_c, v_u = torch.full((4, 2, 2), 3.0), torch.full((4, 2, 2), 1.0)
    assert torch.equal(combine_guidance(v_c, v_u, 2.0), torch.full((4, 2, 2), 5.0))  # 1 + 2 * 2
    assert torch.equal(combine_guidance(v_c, v_u, 2.0, "cond"), torch.full((4, 2, 2), 7.0))  # Z-Image: 3 + 2 * 2


def test_video_token_norms_cover_the_temporal_patch() -> None:
    v = torch.randn(3, 2, 4, 4)
    norms = per_token_norms(v, (1, 2, 2))
    assert norms.shape == v.shape
    assert math.isclose(float(norms[0, 0, 0, 0]), float(v[:, 0, :2, :2].norm()), rel_tol=1e-6)
