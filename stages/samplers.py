"""Flow-matching samplers behind one small interface (Wan's schedules: docs/wan-model.md, "Sampling").

The DiT predicts a velocity v = dx/dsigma along x_sigma = (1 - sigma) * x0 + sigma * noise, so
x0 = x - sigma * v. A sampler owns the sigma schedule, the timesteps the DiT sees, and
the update rule. Four are implemented (SAMPLER_NAMES); each family offers its own (Wan: the first
three, FLUX.1: the last; `ModelDescription.samplers`):

- "unipc" (default): Wan's `FlowUniPCMultistepScheduler`, a flow copy of diffusers 0.31 UniPC
  (order 2, predict-x0, bh2, lower-order final step, final sigma 0) on Wan's own schedule
  sigma_k = shift(linspace(0.999, 0, N + 1)[k]). diffusers' flow UniPC uses another schedule
  (linspace(1, 1/1000)), which moves the tail timesteps, so we rebuild Wan's exactly.
- "dpm++": Wan's `FlowDPMSolverMultistepScheduler` (dpmsolver++, order 2, midpoint,
  lower-order final step) on sigma_k = shift(linspace(1, 0, N + 1)[k]), starting at t = 1000.
- "euler": plain flow Euler, x_{k+1} = x_k + (sigma_{k+1} - sigma_k) * v. Wan ships no Euler
  sampler; we run it on the unipc schedule so that switching sampler changes only the update
  rule, never the timesteps the DiT (and a Wan2.2 expert switch) sees.
- "flowmatch-euler": the same Euler update on the FLUX.1 schedule of diffusers'
  `FlowMatchEulerDiscreteScheduler` (linspace(1, 1/N, N), shifted, final 0), whose timesteps are the
  unrounded float sigma * 1000. FLUX.1-dev's shift s = exp(mu) grows with the image size (`flux_shift`,
  i.e. `models.family.DynamicShift`, which the request resolution uses too).

The arithmetic copies the reference op by op: the schedule in float64 numpy, sigmas stored as
float32, per-step coefficients as 0-d float32 tensors combined in the same order, so on fp32
inputs the results are bit-identical to the reference schedulers (see tests/stages/test_samplers.py).

A sampler is created per request and keeps its multistep history on the instance; nothing is
shared between instances, so interleaved requests cannot disturb each other.
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol

import numpy as np
import torch

from models.family import DynamicShift
from stages.sampler_names import DEFAULT_SAMPLER, SAMPLER_NAMES, SamplerName

__all__ = ["DEFAULT_SAMPLER", "SAMPLER_NAMES", "DPMSolverSampler", "EulerSampler", "FlowMatchEulerSampler",
           "FlowSampler", "SamplerName", "UniPCSampler", "dpm_sigmas", "flowmatch_sigmas", "flux_image_seq_len",
           "flux_mu", "flux_shift", "make_sampler", "shift_sigmas", "unipc_sigmas"]

logger = logging.getLogger(__name__)

# Wan trains on 1000 discrete timesteps; t = sigma * 1000, truncated to int64.
NUM_TRAIN_TIMESTEPS = 1000
# Wan builds its UniPC scheduler with shift 1, whose largest training sigma is 1 - 1/1000 stored
# as float32 and read back with `.item()`; `set_timesteps` starts its linspace from that value.
_UNIPC_SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))


class FlowSampler(Protocol):
    """What the denoise loop needs from a sampler.

    timesteps: (N,) what the DiT sees at step k: int64 for Wan's samplers, float32 sigma * 1000 for
    "flowmatch-euler" (FLUX embeds the unrounded value); may repeat for large N with large shift,
    so steps are addressed by index, never by timestep value.
    sigmas: (N + 1,) float32, noise level before step k, with a final 0.
    step(velocity, k, sample): advance `sample` (any shape, e.g. (C, F, H, W)) from sigmas[k] to
    sigmas[k + 1] given the DiT velocity at step k; computes in fp32 and returns sample.dtype.
    Multistep samplers require k = 0, 1, ..., N - 1 in order.
    """

    name: str
    timesteps: torch.Tensor
    sigmas: torch.Tensor

    def step(self, velocity: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------

def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """Wan's timestep shift s * sigma / (1 + (s - 1) * sigma); s > 1 spends more steps at high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def unipc_sigmas(num_steps: int, shift: float) -> np.ndarray:
    """(N,) float64 sigmas of Wan's `FlowUniPCMultistepScheduler.set_timesteps(N, shift=s)`."""
    base = np.linspace(_UNIPC_SIGMA_MAX, 0.0, num_steps + 1).copy()[:-1]
    return shift_sigmas(base, shift)


def dpm_sigmas(num_steps: int, shift: float) -> np.ndarray:
    """(N,) float64 sigmas of Wan's `get_sampling_sigmas(N, s)` (the dpm++ path); sigma_0 = 1."""
    return shift_sigmas(np.linspace(1, 0, num_steps + 1)[:num_steps], shift)


def _discretize(sigmas: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps int64 (N,), sigmas float32 (N + 1,)) as Wan's set_timesteps stores them."""
    timesteps = torch.from_numpy(sigmas * NUM_TRAIN_TIMESTEPS).to(torch.int64)  # truncates
    with_zero = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    return timesteps, with_zero


def _check_schedule_args(num_steps: int, shift: float) -> None:
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------

class _Sampler:
    """Schedule bookkeeping shared by the samplers; subclasses implement `step`."""

    name: str = ""

    def __init__(self, sigmas: np.ndarray) -> None:
        self.timesteps, self.sigmas = _discretize(sigmas)
        self.num_steps = len(self.timesteps)
        # alpha, sigma, lambda = log(alpha) - log(sigma) per sigma index, as 0-d float32 tensors
        # (the reference recomputes them from 0-d tensors with the same ops; caching keeps the values).
        self._alpha = [1 - s for s in self.sigmas]
        self._sigma = list(self.sigmas)
        self._lambda = [torch.log(a) - torch.log(s) for a, s in zip(self._alpha, self._sigma)]
        self._next_index = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_steps={self.num_steps}, timesteps={self.timesteps[:3].tolist()}...)"

    def _advance(self, step_index: int) -> None:
        """Multistep history only fits consecutive steps, so any other order is an error."""
        if step_index != self._next_index:
            raise ValueError(
                f"{self.name} sampler expected step {self._next_index} of {self.num_steps}, got {step_index}; "
                "steps must be taken in order 0..N-1, with a fresh sampler per request"
            )
        self._next_index += 1


class UniPCSampler(_Sampler):
    """Wan's FlowUniPCMultistepScheduler: UniP predictor (order <= 2) + UniC corrector, predict-x0, bh2."""

    name = "unipc"
    solver_order = 2

    def __init__(self, num_steps: int, shift: float) -> None:
        _check_schedule_args(num_steps, shift)
        super().__init__(unipc_sigmas(num_steps, shift))
        self._model_outputs: list[torch.Tensor] = []  # x0 predictions of the last solver_order steps, newest last
        self._last_sample: torch.Tensor | None = None  # predictor input of the previous step
        self._last_order = 0  # order of the previous predictor = order of this step's corrector
        self._lower_order_nums = 0  # warm-up counter, capped at solver_order

    def step(self, velocity: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        self._advance(step_index)
        k = step_index
        x = sample.to(torch.float32, copy=True)  # kept as history: the caller may reuse its buffer
        x0 = x - self.sigmas[k] * velocity.float()
        if k > 0 and self._last_sample is not None:
            x = self._correct(x0, k, self._last_sample)

        self._model_outputs = (self._model_outputs + [x0])[-self.solver_order:]
        # Lower-order final step and warm-up: order 1 on the first and the last step.
        order = min(self.solver_order, self.num_steps - k, self._lower_order_nums + 1)
        self._last_order = order
        self._last_sample = x
        x_next = self._predict(x, k, order)
        self._lower_order_nums = min(self._lower_order_nums + 1, self.solver_order)
        return x_next.to(sample.dtype)

    def _coefficients(self, t: int, s0: int) -> tuple[torch.Tensor, ...]:
        """h, hh = -h, h*phi_1 = expm1(hh) and B(h) = expm1(hh) (bh2) between sigma indices s0 -> t."""
        h = self._lambda[t] - self._lambda[s0]
        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = torch.expm1(hh)
        return h, hh, h_phi_1, b_h

    def _predict(self, x: torch.Tensor, k: int, order: int) -> torch.Tensor:
        """UniP-`order` from sigma_k to sigma_{k+1} (multistep_uni_p_bh_update)."""
        alpha_t, sigma_t, sigma_s0 = self._alpha[k + 1], self._sigma[k + 1], self._sigma[k]
        h, _, h_phi_1, b_h = self._coefficients(k + 1, k)
        m0 = self._model_outputs[-1]
        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        if order == 2:
            rk = (self._lambda[k - 1] - self._lambda[k]) / h
            d1 = (self._model_outputs[-2] - m0) / rk
            x_t = x_t - alpha_t * b_h * (0.5 * d1)  # rho_p = 0.5 for order 2
        return x_t

    def _correct(self, model_t: torch.Tensor, k: int, x: torch.Tensor) -> torch.Tensor:
        """UniC of the sample at sigma_k, given the new x0 prediction `model_t` and the previous
        step's predictor input `x` (multistep_uni_c_bh_update); its order is the previous predictor's."""
        order = self._last_order
        alpha_t, sigma_t, sigma_s0 = self._alpha[k], self._sigma[k], self._sigma[k - 1]
        h, hh, h_phi_1, b_h = self._coefficients(k, k - 1)
        m0 = self._model_outputs[-1]
        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        d1_t = model_t - m0
        if order == 1:
            return x_t - alpha_t * b_h * (0.5 * d1_t)  # rho_c = 0.5 for order 1
        rk = (self._lambda[k - 2] - self._lambda[k - 1]) / h
        d1 = (self._model_outputs[-2] - m0) / rk
        # rho_c solves R rho = b with R = [[1, 1], [rk, 1]] and the bh2 b-vector.
        h_phi_k = h_phi_1 / hh - 1
        b1 = h_phi_k * 1 / b_h
        h_phi_k = h_phi_k / hh - 1 / 2
        b2 = h_phi_k * 2 / b_h
        rks = torch.stack([rk, torch.ones((), dtype=rk.dtype)])
        r = torch.stack([torch.pow(rks, 0), torch.pow(rks, 1)])
        rhos_c = torch.linalg.solve(r, torch.stack([b1, b2]))
        return x_t - alpha_t * b_h * (rhos_c[0] * d1 + rhos_c[1] * d1_t)


class DPMSolverSampler(_Sampler):
    """Wan's FlowDPMSolverMultistepScheduler: multistep dpmsolver++ order 2 (midpoint), first-order last step."""

    name = "dpm++"

    def __init__(self, num_steps: int, shift: float) -> None:
        _check_schedule_args(num_steps, shift)
        super().__init__(dpm_sigmas(num_steps, shift))
        self._prev_x0: torch.Tensor | None = None

    def step(self, velocity: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        self._advance(step_index)
        k = step_index
        x = sample.float()
        m0 = x - self.sigmas[k] * velocity.float()
        m1, self._prev_x0 = self._prev_x0, m0

        alpha_t, sigma_t, sigma_s0 = self._alpha[k + 1], self._sigma[k + 1], self._sigma[k]
        h = self._lambda[k + 1] - self._lambda[k]
        # sigma_0 = 1 gives lambda_0 = -inf: step 0 is DDIM, and step 1's D1 term vanishes (1/r0 = 0).
        first_order = m1 is None or k == self.num_steps - 1
        if first_order:
            x_next = (sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * m0
        else:
            h_0 = self._lambda[k] - self._lambda[k - 1]
            r0 = h_0 / h
            d1 = (1.0 / r0) * (m0 - m1)
            x_next = (
                (sigma_t / sigma_s0) * x
                - (alpha_t * (torch.exp(-h) - 1.0)) * m0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
            )
        return x_next.to(sample.dtype)


class EulerSampler(_Sampler):
    """Flow Euler x_{k+1} = x_k + (sigma_{k+1} - sigma_k) * v on the unipc schedule (stateless)."""

    name = "euler"

    def __init__(self, num_steps: int, shift: float) -> None:
        _check_schedule_args(num_steps, shift)
        super().__init__(unipc_sigmas(num_steps, shift))

    def step(self, velocity: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        if not 0 <= step_index < self.num_steps:
            raise ValueError(f"euler sampler step must be in 0..{self.num_steps - 1}, got {step_index}")
        dt = self.sigmas[step_index + 1] - self.sigmas[step_index]
        return (sample.float() + dt * velocity.float()).to(sample.dtype)


# ---------------------------------------------------------------------------------------------
# FLUX.1: flow-match Euler with a resolution-dependent shift
# ---------------------------------------------------------------------------------------------

# FLUX's latent is 8x smaller than the image and packed in 2x2 patches: one token per 16x16 pixels.
FLUX_PIXELS_PER_TOKEN = 16
# The resolution-dependent shift (mu linear in the image tokens, 0.5 at 256 and 1.15 at 4096); one
# implementation, torch-free, shared with the request resolution (stages/params.py).
FLUX_DYNAMIC_SHIFT = DynamicShift()


def flux_image_seq_len(height: int, width: int) -> int:
    """Image tokens the FLUX.1 DiT sees for an image of height x width pixels (rounded down to 16)."""
    if height < FLUX_PIXELS_PER_TOKEN or width < FLUX_PIXELS_PER_TOKEN:
        raise ValueError(f"height and width must be >= {FLUX_PIXELS_PER_TOKEN}, got {height}x{width}")
    return (height // FLUX_PIXELS_PER_TOKEN) * (width // FLUX_PIXELS_PER_TOKEN)


def flux_mu(image_seq_len: int) -> float:
    """FLUX.1-dev's mu at this image sequence length (`DynamicShift.mu`)."""
    return FLUX_DYNAMIC_SHIFT.mu(image_seq_len)


def flux_shift(image_seq_len: int) -> float:
    """The shift s = exp(mu) of `FlowMatchEulerSampler` for FLUX.1-dev at this sequence length (1.0 = none)."""
    return FLUX_DYNAMIC_SHIFT.shift(image_seq_len)


def flowmatch_sigmas(num_steps: int, shift: float, shift_terminal: float | None = None) -> np.ndarray:
    """(N,) float32 sigmas: linspace(1, 1/N, N) in float64, stored as float32, then s / (s + (1/sigma - 1)).

    With s = exp(mu) this is the exponential time shift e^mu / (e^mu + (1/sigma - 1)), evaluated in
    float32 numpy exactly as diffusers does; s = 1 (FLUX.1-schnell) leaves the linspace unshifted.
    Mathematically it equals Wan's s * sigma / (1 + (s - 1) * sigma) (diffusers evaluates a static shift in
    that form, which differs from this one by float32 rounding only).

    shift_terminal (Qwen-Image: 0.02): then stretch 1 - sigma linearly so the last sigma lands on it, leaving
    sigma_0 = 1 (diffusers' `stretch_shift_to_terminal`, same float32 operations). A one-step schedule is the
    single sigma 1, which no stretch can move (diffusers divides by zero there): it stays [1].
    """
    _check_schedule_args(num_steps, shift)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    if shift != 1.0:
        sigmas = shift / (shift + (1 / sigmas - 1) ** 1.0)
    if shift_terminal is not None:
        if not 0 < shift_terminal < 1:
            raise ValueError(f"shift_terminal must be in (0, 1), got {shift_terminal!r}")
        if num_steps == 1:
            return sigmas
        one_minus_z = 1 - sigmas
        scale_factor = one_minus_z[-1] / (1 - shift_terminal)
        sigmas = 1 - (one_minus_z / scale_factor)
    return sigmas


class FlowMatchEulerSampler:
    """Flow Euler x_{k+1} = x_k + (sigma_{k+1} - sigma_k) * v in fp32 on FLUX's schedule (stateless).

    `shift` is exp(mu): `flux_shift(flux_image_seq_len(h, w))` for FLUX.1-dev, 1.0 for schnell; `shift_terminal`
    stretches the schedule's end (`flowmatch_sigmas`). timesteps are float32 sigma * 1000 (the FLUX DiT divides
    by 1000 again and embeds the float).
    """

    name = "flowmatch-euler"

    def __init__(self, num_steps: int, shift: float, shift_terminal: float | None = None) -> None:
        sigmas = torch.from_numpy(flowmatch_sigmas(num_steps, shift, shift_terminal)).to(torch.float32)
        self.timesteps = sigmas * NUM_TRAIN_TIMESTEPS
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self.num_steps = num_steps

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_steps={self.num_steps}, sigmas={self.sigmas[:3].tolist()}...)"

    def step(self, velocity: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        if not 0 <= step_index < self.num_steps:
            raise ValueError(f"{self.name} sampler step must be in 0..{self.num_steps - 1}, got {step_index}")
        dt = self.sigmas[step_index + 1] - self.sigmas[step_index]
        return (sample.float() + dt * velocity.float()).to(sample.dtype)


_SAMPLERS: dict[str, Callable[[int, float], FlowSampler]] = {
    "unipc": UniPCSampler,
    "euler": EulerSampler,
    "dpm++": DPMSolverSampler,
    "flowmatch-euler": FlowMatchEulerSampler,  # FLUX.1
}


def make_sampler(name: str, num_steps: int, shift: float, shift_terminal: float | None = None) -> FlowSampler:
    """A fresh sampler for one request: `name` in SAMPLER_NAMES, N steps, shift s > 0; `shift_terminal` (a model
    param, `ModelDescription.shift_terminal`) only on the flow-match schedule, whose end it stretches."""
    try:
        cls = _SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}") from None
    if shift_terminal is not None:
        if cls is not FlowMatchEulerSampler:
            raise ValueError(f"shift_terminal applies to the flowmatch-euler schedule only, not {name!r}")
        sampler: FlowSampler = FlowMatchEulerSampler(num_steps, shift, shift_terminal)
    else:
        sampler = cls(num_steps, shift)
    logger.debug("sampler %s: %d steps, shift %s, t[0]=%d", name, num_steps, shift, int(sampler.timesteps[0]))
    return sampler
