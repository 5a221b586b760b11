"""Samplers: Wan's schedules (docs/wan-model.md, "Sampling"), parity with diffusers' schedulers, convergence."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from models.wan.config import get_preset
from stages.samplers import SAMPLER_NAMES, make_sampler, unipc_sigmas

# Every op is copied from the reference in the same dtype and order, so on fp32 inputs the
# results are bit-identical (measured max |diff| = 0); the tolerance only allows for a BLAS/LAPACK
# build that rounds the 2x2 UniC solve differently.
PARITY_ATOL = 1e-6


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------

def test_unipc_schedule_matches_wan_50_steps_shift_5() -> None:
    s = make_sampler("unipc", 50, 5.0)
    t = s.timesteps.tolist()
    assert s.timesteps.dtype == torch.int64 and s.sigmas.dtype == torch.float32
    assert len(t) == 50 and s.sigmas.shape == (51,)
    assert t[:6] == [999, 995, 991, 987, 982, 978]
    assert t[-5:] == [356, 302, 241, 172, 92]  # diffusers' flow UniPC would give ..., 305, 244, 175, 96
    assert float(s.sigmas[0]) == pytest.approx(0.99980, abs=5e-6)
    assert float(s.sigmas[-1]) == 0.0


def test_wan22_schedule_and_expert_split() -> None:
    preset = get_preset("wan2.2-t2v-a14b")
    d = preset.defaults
    s = make_sampler(d.sampler, d.num_inference_steps, d.shift)
    t = s.timesteps.tolist()
    assert t[:5] == [999, 997, 995, 993, 990]
    assert t[-3:] == [492, 386, 235]
    i = t.index(888)
    assert t[i:i + 4] == [888, 877, 865, 852]
    boundary = preset.boundary * 1000
    assert sum(x >= boundary for x in t) == 26
    assert sum(x < boundary for x in t) == 14


def test_dpm_schedule_starts_at_sigma_one() -> None:
    s = make_sampler("dpm++", 50, 5.0)
    assert int(s.timesteps[0]) == 1000 and float(s.sigmas[0]) == 1.0
    assert s.timesteps.tolist()[1:4] == [995, 991, 987]
    assert float(s.sigmas[-1]) == 0.0 and s.sigmas.shape == (51,)


def test_euler_runs_on_the_unipc_schedule() -> None:
    euler, unipc = make_sampler("euler", 40, 12.0), make_sampler("unipc", 40, 12.0)
    assert torch.equal(euler.timesteps, unipc.timesteps)
    assert torch.equal(euler.sigmas, unipc.sigmas)


def test_large_shift_repeats_timesteps_so_steps_go_by_index() -> None:
    t = make_sampler("unipc", 200, 12.0).timesteps.tolist()
    assert t[:3] == [999, 999, 999]


# ---------------------------------------------------------------------------------------------
# Parity with diffusers on the same sigmas
# ---------------------------------------------------------------------------------------------

def _toy_velocity(seed: int = 0):
    """A fixed nonlinear velocity field over (..., C=4, F, H, W) that also depends on the timestep."""
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)) * 0.7

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mixed = torch.einsum("ij,...jfhw->...ifhw", w, x)
        return torch.tanh(mixed) * (t.float() / 1000) + 0.3 * x - 0.1

    return velocity


def _compare(ours, ref, ref_timesteps: torch.Tensor, steps: int) -> float:
    """Run both from the same noise; ours on (C, F, H, W), the reference on Wan's (1, C, F, H, W)."""
    velocity = _toy_velocity()
    x_ref = torch.randn(1, 4, 2, 3, 5, generator=torch.Generator().manual_seed(1))
    x_ours = x_ref[0].clone()
    worst = 0.0
    for k in range(steps):
        t = ours.timesteps[k]
        x_ours = ours.step(velocity(x_ours, t), k, x_ours)
        x_ref = ref.step(velocity(x_ref, t), ref_timesteps[k], x_ref).prev_sample
        worst = max(worst, (x_ours - x_ref[0]).abs().max().item())
    assert x_ours.abs().max() > 0.1  # a real trajectory, not a collapse to zero
    return worst


@pytest.mark.parametrize("steps,shift", [(12, 5.0), (25, 12.0), (2, 3.0)])
def test_unipc_matches_diffusers_unipc(steps: int, shift: float) -> None:
    ref = UniPCMultistepScheduler(
        solver_order=2, prediction_type="flow_prediction", predict_x0=True, solver_type="bh2",
        lower_order_final=True, use_flow_sigmas=True, flow_shift=1.0, final_sigmas_type="zero",
    )
    ref.set_timesteps(sigmas=unipc_sigmas(steps, shift))  # flow_shift 1 leaves Wan's shifted sigmas as they are
    ours = make_sampler("unipc", steps, shift)
    assert torch.equal(ref.sigmas, ours.sigmas) and torch.equal(ref.timesteps, ours.timesteps)
    assert _compare(ours, ref, ref.timesteps, steps) <= PARITY_ATOL


@pytest.mark.parametrize("steps,shift", [(12, 5.0), (25, 12.0)])
def test_dpm_matches_diffusers_dpmsolver(steps: int, shift: float) -> None:
    ref = DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0, final_sigmas_type="zero",
    )
    ref.set_timesteps(steps)  # no `sigmas=` argument in diffusers' DPM-Solver: put Wan's schedule in place
    ours = make_sampler("dpm++", steps, shift)
    ref.sigmas, ref.timesteps = ours.sigmas.clone(), ours.timesteps.clone()
    assert _compare(ours, ref, ref.timesteps, steps) <= PARITY_ATOL


@pytest.mark.parametrize("steps,shift", [(12, 5.0)])
def test_euler_matches_diffusers_flow_match_euler(steps: int, shift: float) -> None:
    ref = FlowMatchEulerDiscreteScheduler(shift=1.0)
    ref.set_timesteps(sigmas=unipc_sigmas(steps, shift))
    ours = make_sampler("euler", steps, shift)
    assert torch.equal(ref.sigmas, ours.sigmas)
    assert _compare(ours, ref, ref.timesteps, steps) <= PARITY_ATOL


# ---------------------------------------------------------------------------------------------
# Convergence on an ODE with a known solution
# ---------------------------------------------------------------------------------------------

# Data x0 ~ N(MU, S^2) per element: x_sigma ~ N((1-sigma) MU, (1-sigma)^2 S^2 + sigma^2), and the
# probability-flow ODE is the affine map x_sigma = m(sigma) + std(sigma) z, so it ends at MU + S z.
MU, S = 0.3, 0.5


def _mean_std(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (1 - sigma) * MU, torch.sqrt((1 - sigma) ** 2 * S * S + sigma * sigma)


def _gaussian_velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    mean, std = _mean_std(sigma)
    return -MU + (sigma - (1 - sigma) * S * S) / std**2 * (x - mean)


def _endpoint_error(name: str, steps: int, shift: float = 3.0) -> float:
    sampler = make_sampler(name, steps, shift)
    z = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64)
    mean, std = _mean_std(sampler.sigmas[0].double())
    x = (mean + std * z).float()  # exactly on the trajectory at the first sigma
    for k in range(steps):
        v = _gaussian_velocity(x.double(), sampler.sigmas[k].double()).float()
        x = sampler.step(v, k, x)
    return (x.double() - (MU + S * z)).abs().max().item()


@pytest.mark.parametrize("name,tol", [("unipc", 2e-3), ("dpm++", 5e-3), ("euler", 3e-2)])
def test_samplers_converge_to_the_exact_endpoint(name: str, tol: float) -> None:
    errors = [_endpoint_error(name, n) for n in (10, 40, 160)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < tol, errors
    if name == "euler":  # first order: 4x the steps, about 4x less error
        assert 3.0 < errors[1] / errors[2] < 5.0, errors
    else:  # multistep second order beats Euler at equal cost
        assert errors[1] < _endpoint_error("euler", 40) / 4, errors


# ---------------------------------------------------------------------------------------------
# Per-request state and argument checks
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_interleaved_requests_do_not_share_state(name: str) -> None:
    velocity = _toy_velocity()
    x_a = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    x_b = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(3))

    def alone(x: torch.Tensor) -> torch.Tensor:
        s = make_sampler(name, 6, 5.0)
        for k in range(6):
            x = s.step(velocity(x, s.timesteps[k]), k, x)
        return x

    expected_a, expected_b = alone(x_a), alone(x_b)
    sa, sb = make_sampler(name, 6, 5.0), make_sampler(name, 6, 5.0)
    for k in range(6):
        x_a = sa.step(velocity(x_a, sa.timesteps[k]), k, x_a)
        x_b = sb.step(velocity(x_b, sb.timesteps[k]), k, x_b)
    assert torch.equal(x_a, expected_a) and torch.equal(x_b, expected_b)


@pytest.mark.parametrize("name", ["unipc", "dpm++"])
def test_multistep_samplers_reject_out_of_order_steps(name: str) -> None:
    s = make_sampler(name, 4, 5.0)
    x = torch.zeros(4, 1, 2, 2)
    with pytest.raises(ValueError, match="expected step 0 of 4, got 1"):
        s.step(x, 1, x)
    s.step(x, 0, x)
    with pytest.raises(ValueError, match="expected step 1"):
        s.step(x, 0, x)


def test_euler_rejects_out_of_range_step() -> None:
    s = make_sampler("euler", 4, 5.0)
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="0..3, got 4"):
        s.step(x, 4, x)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_step_keeps_the_sample_dtype(name: str) -> None:
    s = make_sampler(name, 3, 5.0)
    x = torch.randn(4, 1, 2, 2).to(torch.bfloat16)
    out = s.step(torch.randn(4, 1, 2, 2), 0, x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_make_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"unknown sampler 'ddim'; choose one of unipc, euler, dpm\+\+"):
        make_sampler("ddim", 10, 5.0)
    with pytest.raises(ValueError, match="num_steps must be a positive integer, got 0"):
        make_sampler("unipc", 0, 5.0)
    with pytest.raises(ValueError, match="shift must be > 0, got 0.0"):
        make_sampler("euler", 10, 0.0)
