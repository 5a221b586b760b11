"""FLUX.1's flow-match Euler sampler vs diffusers' FlowMatchEulerDiscreteScheduler as FluxPipeline drives it.

The reference is built as the FLUX.1-dev pipeline builds it: dynamic shifting, sigmas
linspace(1, 1/N, N) and mu from `calculate_shift` on the packed latent's sequence length; schnell
uses the static shift 1. The schedule is computed with the same float32 numpy operations, so sigmas,
timesteps and Euler updates are expected bit-identical (measured max |diff| = 0).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from stages.samplers import (
    SAMPLER_NAMES,
    FlowMatchEulerSampler,
    flux_image_seq_len,
    flux_mu,
    flux_shift,
    make_sampler,
)

ATOL = 1e-6  # measured 0; allows for a libm whose exp/pow rounds differently in the last bit

SIZES = [(1024, 1024), (512, 768), (256, 256), (1360, 768), (32, 32)]


def _dev_reference(num_steps: int, seq_len: int) -> FlowMatchEulerDiscreteScheduler:
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return sched


def _packed_seq_len(height: int, width: int) -> int:
    """What FluxPipeline reads off its packed latents: (2 * (H // 16)) // 2 * (2 * (W // 16)) // 2."""
    h, w = 2 * (height // 16), 2 * (width // 16)
    return (h // 2) * (w // 2)


@pytest.mark.parametrize("num_steps", [1, 4, 28, 50])
@pytest.mark.parametrize("size", SIZES)
def test_dev_schedule_and_timesteps_match_diffusers(size: tuple[int, int], num_steps: int) -> None:
    seq = flux_image_seq_len(*size)
    assert seq == _packed_seq_len(*size)
    assert flux_mu(seq) == calculate_shift(seq, 256, 4096, 0.5, 1.15)
    ref = _dev_reference(num_steps, seq)
    ours = make_sampler("flowmatch-euler", num_steps, flux_shift(seq))
    assert isinstance(ours, FlowMatchEulerSampler)
    assert ours.sigmas.dtype == torch.float32 and ours.timesteps.dtype == torch.float32
    assert ours.sigmas.shape == (num_steps + 1,) and float(ours.sigmas[-1]) == 0.0
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=0, atol=ATOL)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=ATOL * 1000)


def test_dev_1024_28_steps_known_values() -> None:
    s = FlowMatchEulerSampler(28, flux_shift(flux_image_seq_len(1024, 1024)))
    assert flux_mu(4096) == pytest.approx(1.15) and flux_mu(256) == pytest.approx(0.5)
    assert s.sigmas[:3].tolist() == pytest.approx([1.0, 0.988409, 0.976222], abs=1e-6)
    assert s.sigmas[-3:].tolist() == pytest.approx([0.195455, 0.104721, 0.0], abs=1e-6)
    assert float(s.timesteps[0]) == 1000.0


def test_schnell_schedule_is_unshifted_and_matches_static_diffusers() -> None:
    ref = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=calculate_shift(4096))
    ours = FlowMatchEulerSampler(4, 1.0)
    assert ours.sigmas.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert torch.equal(ours.sigmas, ref.sigmas) and torch.equal(ours.timesteps, ref.timesteps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_steps_match_diffusers(dtype: torch.dtype) -> None:
    """Both upcast the sample to fp32; diffusers multiplies dt by the velocity in the velocity's dtype
    (bf16 for a bf16 DiT), we do the whole update in fp32, so the reference gets an fp32 velocity."""
    num_steps, seq = 5, flux_image_seq_len(512, 768)
    ref = _dev_reference(num_steps, seq)
    ref.set_begin_index(0)
    ours = FlowMatchEulerSampler(num_steps, flux_shift(seq))
    g = torch.Generator().manual_seed(0)
    x_ref = x_ours = torch.randn(2, seq, 64, generator=g).to(dtype)  # packed FLUX latents
    for k, t in enumerate(ref.timesteps):
        v = torch.randn(2, seq, 64, generator=g).to(dtype)  # any velocity: the update is what is tested
        x_ref = ref.step(v.float(), t, x_ref, return_dict=False)[0].to(dtype)
        x_ours = ours.step(v, k, x_ours)
        assert x_ours.dtype == dtype
        torch.testing.assert_close(x_ours.float(), x_ref.float(), rtol=0, atol=ATOL)


def test_euler_integrates_a_straight_flow_exactly() -> None:
    """v = noise - x0 is constant along the straight path, so Euler lands on x0 from sigma 1 for any schedule."""
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    s = FlowMatchEulerSampler(7, flux_shift(2048))
    x = noise.clone()
    for k in range(s.num_steps):
        x = s.step(noise - x0, k, x)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-5)


def test_name_is_offered_to_requests_and_is_flux_only() -> None:
    from models.flux.config import FLUX_SAMPLERS
    from models.wan.config import WAN_SAMPLERS

    assert "flowmatch-euler" in SAMPLER_NAMES and FLUX_SAMPLERS == ("flowmatch-euler",)
    assert "flowmatch-euler" not in WAN_SAMPLERS
    assert make_sampler("flowmatch-euler", 3, 1.0).name == "flowmatch-euler"


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(ValueError, match="num_steps must be a positive integer, got 0"):
        FlowMatchEulerSampler(0, 1.0)
    with pytest.raises(ValueError, match="shift must be > 0"):
        FlowMatchEulerSampler(4, 0.0)
    with pytest.raises(ValueError, match=r"step must be in 0\.\.3, got 4"):
        FlowMatchEulerSampler(4, 1.0).step(torch.zeros(1), 4, torch.zeros(1))
    with pytest.raises(ValueError, match="height and width must be >= 16"):
        flux_image_seq_len(8, 1024)
    assert flux_shift(256) == pytest.approx(math.exp(0.5))
