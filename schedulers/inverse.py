"""DDIM inversion: the deterministic DDIM map run backwards, clean latent -> noise latent.

DDIM with eta = 0 (Song et al. 2021, eq. 12) is an Euler step of an ODE, so it can be run the
other way (Song et al. 2021, Sec. 4.3 and eq. 13; Dhariwal & Nichol 2021, App. F; Mokady et al.
2023, "Null-text inversion", Sec. 3). Sampling step i of a DDIM plan moves x from the level
alpha_bar[i] (timestep t_i) down to alpha_bar_prev[i]; its inverse moves x from alpha_bar_prev[i]
up to alpha_bar[i]:

    x0_hat = (x - sqrt(1 - alpha_bar_prev) eps) / sqrt(alpha_bar_prev)       (DDPM eq. 15)
    x_next = sqrt(alpha_bar) x0_hat + sqrt(1 - alpha_bar) eps,   eps = eps_theta(x, t_i)

The network is called at t_i, the timestep of the level being climbed to, with the sample still
at the lower level. That is the convention of diffusers' DDIMInverseScheduler and of the
null-text-inversion code, chosen for three reasons: (1) the first inverse step starts at the
clean end (alpha_bar_prev = 1, "timestep" t_0 - T // N < 0), where the network has no timestep;
(2) the network sees exactly the timesteps the sampler will call it at, so inverse step and
sampling step i use eps_theta at the same t and differ only by the one-step change of x (the
linearisation eps(x_{t-1}, t) ~ eps(x_t, t) of Mokady et al. eq. 4); (3) parity with diffusers
(tests/test_inversion.py). The plan's steps are the DDIM plan's, reversed: inverting the steps
`upto`..N-1 of a DDIM plan ends at the input level of step `upto`, where that plan's tail
(Sampler.tail(plan, upto)) starts, so sampling the tail maps the result back near x0.

The stepper has the contract of contract.Stepper and is run by the same loop as every sampler
(pipelines.loop.denoise). It is deterministic (no eta, no noise draws) and is deliberately not in
the user-facing SAMPLERS registry: it makes noise from images, not images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .contract import Carry, Denoiser, Noise, Sampler
from .ddim import DDIMPlan
from .schedule import Prediction, StepIndexed
from .tail import check_start, slice_steps, ve_sigma


@dataclass(frozen=True, eq=False)
class DDIMInversePlan(StepIndexed):
    """Inverse step i calls the network at `timesteps[i]` with the sample at level `alpha_bar[i]`
    and moves it up to `alpha_bar_next[i]`. Levels ascend (alpha_bar decreases); read-only."""

    timesteps: torch.Tensor       # (N,) int64, ascending: the network's timestep of step i
    alpha_bar: torch.Tensor       # (N,) float32, the input level (1 at the clean end)
    alpha_bar_next: torch.Tensor  # (N,) float32, the output level, < alpha_bar
    prediction_type: Prediction
    clip_range: float | None      # clamp x0_hat as the DDIM step does; None: no clip

    @property
    def init_noise_sigma(self) -> float:
        return 1.0


def ddim_inverse_plan(plan: DDIMPlan, upto: int = 0) -> DDIMInversePlan:
    """The inverse of the DDIM plan's steps N-1, N-2, ..., `upto` (in that order: from the clean
    end up to the input level of step `upto`, i.e. the first level of plan.tail(upto)).
    upto = 0 inverts the whole plan (to alpha_bar[0], the pure-noise end); upto = N, nothing."""
    upto = check_start(plan, upto, "upto")
    keep = slice(upto, None)
    return DDIMInversePlan(
        timesteps=plan.timesteps[keep].flip(0),
        alpha_bar=plan.alpha_bar_prev[keep].flip(0),
        alpha_bar_next=plan.alpha_bar[keep].flip(0),
        prediction_type=plan.prediction_type,
        clip_range=plan.clip_range,
    )


def ddim_inverse_step(plan: DDIMInversePlan, i: int, x0: torch.Tensor,
                      eps: torch.Tensor) -> torch.Tensor:
    """x_next = sqrt(alpha_bar_next) x0_hat + sqrt(1 - alpha_bar_next) eps (eq. 12, no noise),
    from the network's (x0_hat, eps) at the input level; x0_hat clamped with clip_sample, eps
    kept as predicted (as DDIMInverseScheduler and the forward DDIM step do)."""
    i = plan.check_index(i)
    if plan.clip_range is not None:
        x0 = x0.clamp(-plan.clip_range, plan.clip_range)
    alpha_bar_next = plan.alpha_bar_next[i]
    return alpha_bar_next**0.5 * x0 + (1 - alpha_bar_next) ** 0.5 * eps


@dataclass(frozen=True)
class DDIMInverse:
    """The inverse DDIM stepper (contract.Stepper) over a DDIMInversePlan."""

    name: str = "ddim_inverse"
    space: str = "vp"
    default_eta: float = 0.0

    def make_plan(self, schedule, num_steps, spacing=None):
        raise ValueError("an inverse plan is made from the DDIM plan it inverts: "
                         "ddim_inverse_plan(ddim_plan(schedule, n), upto)")

    def noise_draws(self, plan: DDIMInversePlan, i: int, eta: float) -> int:
        plan.check_index(i)
        if eta:
            raise ValueError(f"DDIM inversion is deterministic: eta must be 0, got {eta!r}")
        return 0

    def model_calls(self, plan: DDIMInversePlan, i: int) -> int:
        plan.check_index(i)
        return 1

    def step(self, denoiser: Denoiser, plan: DDIMInversePlan, i: int, x: torch.Tensor,
             carry: Carry, noise: Noise, *, eta: float) -> tuple[torch.Tensor, Carry]:
        self.noise_draws(plan, i, eta)
        # Denoiser.vp reads x as the VP sample at level alpha_bar[i] (the lower one).
        x0, eps = denoiser.vp(x, int(plan.timesteps[i]), float(plan.alpha_bar[i]))
        return ddim_inverse_step(plan, i, x0, eps), None

    def tail(self, plan: DDIMInversePlan, start: int) -> DDIMInversePlan:
        return slice_steps(plan, start)

    def noised(self, plan, x0, noise):
        raise ValueError("DDIM inversion starts from the clean latent itself, not a noised one")

    def level(self, plan: DDIMInversePlan, i: int) -> float:
        """The VE noise level of step i's input; i = N is the output of the last step."""
        if i < len(plan):
            return ve_sigma(plan.alpha_bar[i])
        return ve_sigma(plan.alpha_bar_next[-1]) if len(plan) else 0.0


# What pipelines.loop.denoise runs to invert (not in schedulers.SAMPLERS).
DDIM_INVERSE = Sampler(name="ddim_inverse", stepper=DDIMInverse(), spacing=None)
