"""Ancestral DDPM sampling (Ho, Jain & Abbeel 2020), as a plan built once and a pure step function.

Each step samples the posterior q(x_prev | x_t, x0) with x0 predicted by the model (eqs. 6-7):

    x_prev = c_x0 x0 + c_xt x_t + sigma_t z,  z ~ N(0, I)
    c_x0 = sqrt(alpha_bar_prev) beta_t / (1 - alpha_bar_t)
    c_xt = sqrt(alpha_t) (1 - alpha_bar_prev) / (1 - alpha_bar_t)

With fewer steps than training timesteps the chain jumps from t to the next planned timestep t_prev,
and alpha_t, beta_t become the jump's: alpha_t = alpha_bar_t / alpha_bar_prev, beta_t = 1 - alpha_t
(past the last step alpha_bar_prev = 1). Sec. 3.2's two variances:

    fixed_small:  sigma_t^2 = beta_tilde_t = (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta_t (eq. 7)
    fixed_large:  sigma_t^2 = beta_t

Like diffusers' DDPMScheduler, beta_tilde is floored at 1e-20, and noise is added at every step
whose timestep is > 0, including a last step at t > 0 (where fixed_large still adds sqrt(beta_t) z).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .schedule import (
    SamplingPlan,
    TrainSchedule,
    alpha_bar_at,
    check_num_steps,
    inference_timesteps,
    require_noise,
)


@dataclass(frozen=True, eq=False)
class DDPMPlan(SamplingPlan):
    coef_x0: torch.Tensor  # (N,) float32, c_x0 of the posterior mean (eq. 7)
    coef_xt: torch.Tensor  # (N,) float32, c_xt of the posterior mean (eq. 7)
    noise_std: torch.Tensor  # (N,) float32, sigma_t for the configured variance_type


def ddpm_plan(schedule: TrainSchedule, num_steps: int) -> DDPMPlan:
    """The timesteps and posterior coefficients for `num_steps` ancestral steps over `schedule`."""
    config = schedule.config
    n = check_num_steps(schedule, num_steps)
    timesteps = inference_timesteps(config, n)
    prev_timesteps = torch.cat([timesteps[1:], timesteps.new_tensor([-1])])
    alpha_bar = schedule.alphas_cumprod[timesteps]
    alpha_bar_prev = alpha_bar_at(schedule, prev_timesteps, 1.0)
    alpha = alpha_bar / alpha_bar_prev
    beta = 1 - alpha
    coef_x0 = (alpha_bar_prev**0.5 * beta) / (1 - alpha_bar)
    coef_xt = alpha**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar)
    if config.variance_type == "fixed_small":
        noise_std = ((1 - alpha_bar_prev) / (1 - alpha_bar) * beta).clamp(min=1e-20) ** 0.5
    else:
        noise_std = beta**0.5
    return DDPMPlan(
        timesteps=timesteps,
        prev_timesteps=prev_timesteps,
        alpha_bar=alpha_bar,
        alpha_bar_prev=alpha_bar_prev,
        prediction_type=config.prediction_type,
        clip_range=config.clip_sample_range if config.clip_sample else None,
        coef_x0=coef_x0,
        coef_xt=coef_xt,
        noise_std=noise_std,
    )


def ddpm_needs_noise(plan: DDPMPlan, i: int, eta: float = 0.0) -> bool:
    """Whether step i adds variance noise: whenever its timestep is > 0. `eta` is ignored."""
    return int(plan.timesteps[plan.check_index(i)]) > 0


def ddpm_step(
    plan: DDPMPlan,
    i: int,
    x: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    *,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One ancestral step from x = x_t at `plan.timesteps[i]`: a draw from q(x_prev | x_t, x0).

    x0 comes from `to_x0_eps` (clamped here with clip_sample); eps and eta are accepted for the
    common sampler signature and unused. `noise` is z, required when
    `ddpm_needs_noise(plan, i, eta)`.
    The arithmetic runs in x0/x's dtype on their device; the plan's values enter as scalars.
    """
    i = plan.check_index(i)
    if plan.clip_range is not None:
        x0 = x0.clamp(-plan.clip_range, plan.clip_range)
    x_prev = plan.coef_x0[i] * x0 + plan.coef_xt[i] * x
    if ddpm_needs_noise(plan, i, eta):
        x_prev = x_prev + plan.noise_std[i] * require_noise(noise, x, "ddpm", i)
    return x_prev
