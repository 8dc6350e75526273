"""The steppers: DDIM / DDPM in VP space, and the k-diffusion family in sigma (VE) space.

Every stepper is a frozen value with pure methods (see contract.Stepper). Sigma-space notation
(Karras et al. 2022, "EDM"): x = x0 + sigma eps, the probability-flow ODE is dx/dsigma = d with
d = (x - D(x, sigma)) / sigma (EDM eq. 3 with sigma(t) = t), and DPM-Solver++ (Lu et al. 2022b)
works in lambda = t_fn(sigma) = -log sigma, with sigma_fn(lambda) = exp(-lambda).

Ancestral steps (k-diffusion's get_ancestral_step) split a move from sigma to sigma_next into a
deterministic move down to sigma_down and fresh noise of std sigma_up, with
sigma_down^2 + sigma_up^2 = sigma_next^2 and
    sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)),
so the marginal at sigma_next is kept (eta = 1 is DDPM's posterior variance, eta = 0 the ODE).

The formulas follow k-diffusion's sample_* functions (facts, re-derived here as pure steps);
k-diffusion is the reference they are tested exact against (tests/test_samplers.py).
The arithmetic runs in x's dtype on its device; per-step scalars are python floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .contract import Carry, Denoiser, Noise, SigmaPlan, check_eta, check_noise
from .ddim import ddim_needs_noise, ddim_plan, ddim_step
from .ddpm import ddpm_needs_noise, ddpm_plan, ddpm_step
from .schedule import SamplingPlan, TrainSchedule
from .spacing import sigma_plan
from .tail import VPTail, slice_steps, ve_noised

# ----------------------------------------------------------------------------------------------
# VP space: DDIM and DDPM, the model called at integer timesteps (bit-exact with diffusers).


@dataclass(frozen=True)
class VPStepper(VPTail):
    """A one-call sampler in VP space that steps from (x0, eps) at integer training timesteps.

    DDIM (Song et al. 2021, eq. 12; eta > 0 adds eq. 16's variance, ddim.py) and ancestral DDPM
    (Ho et al. 2020, eqs. 6-7, ddpm.py) differ only in their plan, step and noise rule.
    """

    name: str
    plan_fn: Callable[[TrainSchedule, int], SamplingPlan]
    needs_noise_fn: Callable[[SamplingPlan, int, float], bool]
    step_fn: Callable[..., torch.Tensor]      # (plan, i, x, x0, eps, *, eta, noise) -> x_prev
    space: str = "vp"
    default_eta: float = 0.0

    def make_plan(self, schedule: TrainSchedule, num_steps: int, spacing: str | None):
        _vp_spacing(self.name, spacing)
        return self.plan_fn(schedule, num_steps)

    def noise_draws(self, plan: SamplingPlan, i: int, eta: float) -> int:
        return int(self.needs_noise_fn(plan, i, eta))

    def model_calls(self, plan: SamplingPlan, i: int) -> int:
        plan.check_index(i)
        return 1

    def step(self, denoiser: Denoiser, plan: SamplingPlan, i: int, x: torch.Tensor,
             carry: Carry, noise: Noise, *, eta: float) -> tuple[torch.Tensor, Carry]:
        i = plan.check_index(i)
        x0, eps = denoiser.vp(x, int(plan.timesteps[i]), float(plan.alpha_bar[i]))
        z = noise[0] if noise else None
        return self.step_fn(plan, i, x, x0, eps, eta=eta, noise=z), None


DDIM = VPStepper("ddim", ddim_plan, ddim_needs_noise, ddim_step)
DDPM = VPStepper("ddpm", ddpm_plan, ddpm_needs_noise, ddpm_step)


def _vp_spacing(name: str, spacing: str | None) -> None:
    if spacing is not None:
        raise ValueError(f"{name} steps at the model's training timesteps; it has no "
                         f"{spacing!r} variant (use a sigma sampler such as euler_{spacing})")


# ----------------------------------------------------------------------------------------------
# Sigma space: the k-diffusion family.


def ancestral(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step (k-diffusion get_ancestral_step)."""
    if not eta:
        return sigma_next, 0.0
    up = min(sigma_next,
             eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(max(sigma_next**2 - up**2, 0.0)), up


def _d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's slope dx/dsigma = (x - D(x, sigma)) / sigma (EDM eq. 3)."""
    return (x - denoised) / sigma


@dataclass(frozen=True)
class _SigmaStepper:
    """What every sigma-space stepper shares: plans from a spacing, index and noise checks."""

    name: str = ""
    space: str = "sigma"
    default_eta: float = 0.0
    # Noise draws of a stochastic step (eta > 0) that does not end at sigma = 0, where every
    # stepper returns the denoised estimate; 0 for the deterministic (ODE) steppers.
    draws: int = 0
    # UNet evaluations of a step that does not end at sigma = 0 (second-order steppers: 2);
    # the last step is a single Euler call for every stepper.
    calls: int = 1

    def make_plan(self, schedule: TrainSchedule, num_steps: int,
                  spacing: str | None) -> SigmaPlan:
        return sigma_plan(schedule, num_steps, spacing)

    def noise_draws(self, plan: SigmaPlan, i: int, eta: float) -> int:
        i = plan.check_index(i)
        return self.draws if eta > 0 and float(plan.sigmas[i + 1]) > 0 else 0

    def model_calls(self, plan: SigmaPlan, i: int) -> int:
        i = plan.check_index(i)
        return self.calls if float(plan.sigmas[i + 1]) > 0 else 1

    def tail(self, plan: SigmaPlan, start: int) -> SigmaPlan:
        """sigmas[start:] and timesteps[start:]: k-diffusion's sampling from a sliced sigma list,
        diffusers' set_begin_index. Multistep history (LMS's slopes, DPM++ 2M's x0) is the
        carry, None at the tail's first step, so the order restarts there (LMS: 1, 2, 3, 4)."""
        return slice_steps(plan, start)

    def noised(self, plan: SigmaPlan, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if len(plan) == 0:
            return x0
        return ve_noised(plan.sigmas[:1], x0, noise)

    def level(self, plan: SigmaPlan, i: int) -> float:
        return float(plan.sigmas[i])

    def _begin(self, plan: SigmaPlan, i: int, x: torch.Tensor, noise: Noise,
               eta: float) -> tuple[int, float, float, Noise]:
        i = plan.check_index(i)
        eta = check_eta(eta, self.name)
        noise = check_noise(noise, self.noise_draws(plan, i, eta), x, self.name, i)
        return i, float(plan.sigmas[i]), float(plan.sigmas[i + 1]), noise


def _first(denoiser: Denoiser, plan: SigmaPlan, i: int, x: torch.Tensor, sigma: float):
    """D(x, sigma_i) at the plan's own model timestep for sigma_i."""
    return denoiser(x, sigma, float(plan.timesteps[i]))


@dataclass(frozen=True)
class Euler(_SigmaStepper):
    """Euler's method on the PF-ODE (EDM Algorithm 2 without churn; k-diffusion sample_euler)."""

    name: str = "euler"

    def step(self, denoiser, plan, i, x, carry, noise, *, eta):
        i, s, s_next, _ = self._begin(plan, i, x, noise, eta)
        denoised = _first(denoiser, plan, i, x, s)
        return x + _d(x, s, denoised) * (s_next - s), None


@dataclass(frozen=True)
class EulerAncestral(_SigmaStepper):
    """Euler down to sigma_down, then noise of std sigma_up (k-diffusion sample_euler_ancestral)."""

    name: str = "euler_a"
    default_eta: float = 1.0
    draws: int = 1


    def step(self, denoiser, plan, i, x, carry, noise, *, eta):
        i, s, s_next, noise = self._begin(plan, i, x, noise, eta)
        denoised = _first(denoiser, plan, i, x, s)
        down, up = ancestral(s, s_next, eta)
        x = x + _d(x, s, denoised) * (down - s)
        if noise:
            x = x + noise[0] * up
        return x, None


@dataclass(frozen=True)
class Heun(_SigmaStepper):
    """Heun's 2nd-order method (EDM Algorithm 1, no churn): Euler, then the trapezoid rule with
    the slope at the Euler point; the last step (to sigma = 0) is plain Euler."""

    name: str = "heun"
    calls: int = 2

    def step(self, denoiser, plan, i, x, carry, noise, *, eta):
        i, s, s_next, _ = self._begin(plan, i, x, noise, eta)
        d = _d(x, s, _first(denoiser, plan, i, x, s))
        dt = s_next - s
        if s_next == 0:
            return x + d * dt, None
        x_2 = x + d * dt
        d_2 = _d(x_2, s_next, denoiser(x_2, s_next, _next_t(plan, i)))
        return x + (d + d_2) / 2 * dt, None


def _next_t(plan: SigmaPlan, i: int) -> float | None:
    return float(plan.timesteps[i + 1]) if i + 1 < len(plan) else None


@dataclass(frozen=True)
class DPM2(_SigmaStepper):
    """DPM-Solver-2 (Lu et al. 2022a) in k-diffusion's form (sample_dpm_2): the slope at the
    log-midpoint sigma_mid = sqrt(sigma sigma_next) carries the full step; last step Euler."""

    name: str = "dpm2"
    calls: int = 2

    def step(self, denoiser, plan, i, x, carry, noise, *, eta):
        i, s, s_next, _ = self._begin(plan, i, x, noise, eta)
        d = _d(x, s, _first(denoiser, plan, i, x, s))
        if s_next == 0:
            return x + d * (s_next - s), None
        return _dpm2_move(denoiser, x, d, s, s_next), None


def _dpm2_move(denoiser, x, d, s, target):
    mid = math.exp((math.log(s) + math.log(target)) / 2)
    x_2 = x + d * (mid - s)
    d_2 = _d(x_2, mid, denoiser(x_2, mid))
    return x + d_2 * (target - s)


@dataclass(frozen=True)
class DPM2Ancestral(_SigmaStepper):
    """DPM-Solver-2 down to sigma_down, then noise of std sigma_up (sample_dpm_2_ancestral)."""

    name: str = "dpm2_a"
    default_eta: float = 1.0

    def noise_draws(self, plan, i, eta):
        i = plan.check_index(i)
        down, _ = ancestral(float(plan.sigmas[i]), float(plan.sigmas[i + 1]), eta)
        return int(eta > 0 and down > 0)

    def model_calls(self, plan, i):
        i = plan.check_index(i)
        down, _ = ancestral(float(plan.sigmas[i]), float(plan.sigmas[i + 1]), 1.0)
        return 2 if down > 0 else 1

    def step(self, denoiser, plan, i, x, carry, noise, *, eta):
        i, s, s_next, noise = self._begin(plan, i, x, noise, eta)
        d = _d(x, s, _first(denoiser, plan, i, x, s))
        down, up = ancestral(s, s_next, eta)
        if down == 0:
            return x + d * (down - s), None
        x = _dpm2_move(denoiser, x, d, s, down)
        if noise:
            x = x + noise[0] * up
        return x, None


LMS_ORDER = 4
# Gauss-Legendre nodes integrate the Lagrange basis (degree < LMS_ORDER) exactly.
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(8)


def lms_coefficients(sigmas: list[float], i: int, order: int) -> list[float]:
    """Linear multistep (Adams-Bashforth in sigma) weights: coefficient j multiplies d_{i-j} and
    is the integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node
    sigma_{i-j} among sigma_i, ..., sigma_{i-order+1} (k-diffusion linear_multistep_coeff, which
    integrates numerically with scipy's quad; here exactly, by Gauss-Legendre, in float64)."""
    a, b = sigmas[i], sigmas[i + 1]
    taus = (b - a) / 2 * _GL_NODES + (a + b) / 2
    out = []
    for j in range(order):
        basis = np.ones_like(taus)
        for k in range(order):
            if k != j:
                basis *= (taus - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        out.append(float((b - a) / 2 * np.dot(_GL_WEIGHTS, basis)))
    return out


@dataclass(frozen=True)
class LMS(_SigmaStepper):
    """Linear multistep of order 4 on the PF-ODE (k-diffusion sample_lms). carry: the last
    (up to 3) slopes d, oldest first, as a tuple."""

    name: str = "lms"

    def step(self, denoiser, plan, i, x, carry, noise, *, eta):
        i, s, _, _ = self._begin(plan, i, x, noise, eta)
        ds = (*(carry or ()), _d(x, s, _first(denoiser, plan, i, x, s)))[-LMS_ORDER:]
        coeffs = lms_coefficients(plan.sigma, i, min(i + 1, LMS_ORDER))
        update = sum(c * d for c, d in zip(coeffs, reversed(ds)))
        return x + update, ds[-(LMS_ORDER - 1):]


@dataclass(frozen=True)
class DPMPP2M(_SigmaStepper):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2) in lambda = -log sigma: a 2nd-order
    multistep update from this x0 and the previous one (carry), first order at the first step,
    and x = x0 at the last (sigma_next = 0). k-diffusion sample_dpmpp_2m."""

    name: str = "dpmpp_2m"

    def step(self, denoiser, plan, i, x, carry, noise, *, eta):
        i, s, s_next, _ = self._begin(plan, i, x, noise, eta)
        denoised = _first(denoiser, plan, i, x, s)
        if s_next == 0:
            return denoised, denoised
        h = math.log(s) - math.log(s_next)          # lambda_next - lambda
        if carry is None:
            d = denoised
        else:
            r = (math.log(float(plan.sigmas[i - 1])) - math.log(s)) / h   # h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * carry
        return (s_next / s) * x - math.expm1(-h) * d, denoised


@dataclass(frozen=True)
class DPMPP2MSDE(_SigmaStepper):
    """DPM-Solver++(2M) SDE, midpoint variant (Lu et al. 2022b, Sec. 5; k-diffusion
    sample_dpmpp_2m_sde): with eta_h = eta h,
        x <- (sigma_next / sigma) e^{-eta_h} x + (1 - e^{-h - eta_h}) x0
             + 0.5 (1 - e^{-h - eta_h}) (h / h_last) (x0 - x0_prev)
             + sigma_next sqrt(1 - e^{-2 eta_h}) z;   x = x0 at the last step. carry: x0_prev."""

    name: str = "dpmpp_2m_sde"
    default_eta: float = 1.0
    draws: int = 1


    def step(self, denoiser, plan, i, x, carry, noise, *, eta):
        i, s, s_next, noise = self._begin(plan, i, x, noise, eta)
        denoised = _first(denoiser, plan, i, x, s)
        if s_next == 0:
            return denoised, denoised
        h = math.log(s) - math.log(s_next)
        eta_h = eta * h
        gain = -math.expm1(-h - eta_h)
        x = (s_next / s * math.exp(-eta_h)) * x + gain * denoised
        if carry is not None:
            h_last = math.log(float(plan.sigmas[i - 1])) - math.log(s)
            x = x + (0.5 * gain * (h / h_last)) * (denoised - carry)
        if noise:
            x = x + noise[0] * (s_next * math.sqrt(-math.expm1(-2 * eta_h)))
        return x, denoised


def _log(v: float) -> float:
    """log v, and -inf at v = 0 (sigma_down = 0 when eta > 1): expm1(-inf) = -1 then makes the
    exponential-integrator update x = x0, its limit."""
    return math.log(v) if v > 0 else -math.inf


@dataclass(frozen=True)
class DPMPPSDE(_SigmaStepper):
    """DPM-Solver++ SDE (k-diffusion sample_dpmpp_sde, r = 1/2): a 2-stage step in lambda with
    an ancestral split at both stages, two noise draws per step; last step Euler."""

    name: str = "dpmpp_sde"
    default_eta: float = 1.0
    draws: int = 2
    calls: int = 2

    def step(self, denoiser, plan, i, x, carry, noise, *, eta):
        i, s, s_next, noise = self._begin(plan, i, x, noise, eta)
        denoised = _first(denoiser, plan, i, x, s)
        if s_next == 0:
            return x + _d(x, s, denoised) * (s_next - s), None
        r = 0.5
        lam, lam_next = -math.log(s), -math.log(s_next)
        s_mid = math.exp(-(lam + r * (lam_next - lam)))
        down, up = ancestral(s, s_mid, eta)
        x_2 = (down / s) * x - math.expm1(lam + _log(down)) * denoised
        if noise:
            x_2 = x_2 + noise[0] * up
        denoised_2 = denoiser(x_2, s_mid)
        down, up = ancestral(s, s_next, eta)
        fac = 1 / (2 * r)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (down / s) * x - math.expm1(lam + _log(down)) * denoised_d
        if noise:
            x = x + noise[1] * up
        return x, None


@dataclass(frozen=True)
class DPMPP2SAncestral(_SigmaStepper):
    """DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1, r = 1/2) down to sigma_down, then noise
    of std sigma_up (k-diffusion sample_dpmpp_2s_ancestral); Euler when sigma_down = 0."""

    name: str = "dpmpp_2s_a"
    default_eta: float = 1.0
    draws: int = 1


    def model_calls(self, plan, i):
        i = plan.check_index(i)
        down, _ = ancestral(float(plan.sigmas[i]), float(plan.sigmas[i + 1]), 1.0)
        return 2 if down > 0 else 1

    def step(self, denoiser, plan, i, x, carry, noise, *, eta):
        i, s, s_next, noise = self._begin(plan, i, x, noise, eta)
        denoised = _first(denoiser, plan, i, x, s)
        down, up = ancestral(s, s_next, eta)
        if down == 0:
            x = x + _d(x, s, denoised) * (down - s)
        else:
            h = math.log(s) - math.log(down)
            s_mid = math.exp(math.log(s) - 0.5 * h)
            x_2 = (s_mid / s) * x - math.expm1(-0.5 * h) * denoised
            denoised_2 = denoiser(x_2, s_mid)
            x = (down / s) * x - math.expm1(-h) * denoised_2
        if noise:
            x = x + noise[0] * up
        return x, None
