"""DDIM sampling (Song, Meng & Ermon 2021), as a plan built once and a pure step function.

Notation: the step at timestep t moves x_t to the lower noise level "prev" (t_prev < t),

    x_prev = sqrt(alpha_bar_prev) x0                         "predicted x0"
           + sqrt(1 - alpha_bar_prev - sigma_t^2) eps        "direction pointing to x_t"
           + sigma_t z,  z ~ N(0, I)                         "random noise"          (eq. 12)

    sigma_t(eta) = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t))
                       sqrt(1 - alpha_bar_t / alpha_bar_prev)                        (eq. 16)

eta = 0 is the deterministic DDIM sampler, eta = 1 the DDPM posterior variance on the same strided
timesteps. x0 and eps come from `to_x0_eps`, so the step never looks at the prediction type.

The plan follows diffusers' DDIMScheduler, quirks included: t_prev is always t - T // N, even for
"trailing" and "linspace" spacing where the next timestep of the plan is a different one; past t = 0
alpha_bar_prev is 1 with set_alpha_to_one, else alpha_bar_0. One deliberate difference: the
direction variance 1 - alpha_bar_prev - sigma_t^2 is floored at 0, where diffusers takes the square
root of a rounding-negative number and returns NaN (eta = 1 with zero terminal SNR, e.g. 50 steps).
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
class DDIMPlan(SamplingPlan):
    variance: torch.Tensor  # (N,) float32, sigma_t(eta=1)^2 of eq. 16


def ddim_plan(schedule: TrainSchedule, num_steps: int) -> DDIMPlan:
    """The timesteps and per-step alpha_bar values for `num_steps` DDIM steps over `schedule`."""
    config = schedule.config
    n = check_num_steps(schedule, num_steps)
    timesteps = inference_timesteps(config, n)
    prev_timesteps = timesteps - config.num_train_timesteps // n
    alpha_bar = schedule.alphas_cumprod[timesteps]
    final = 1.0 if config.set_alpha_to_one else schedule.alphas_cumprod[0]
    alpha_bar_prev = alpha_bar_at(schedule, prev_timesteps, final)
    # eq. 16 with eta = 1, squared.
    variance = ((1 - alpha_bar_prev) / (1 - alpha_bar)) * (1 - alpha_bar / alpha_bar_prev)
    return DDIMPlan(
        timesteps=timesteps,
        prev_timesteps=prev_timesteps,
        alpha_bar=alpha_bar,
        alpha_bar_prev=alpha_bar_prev,
        prediction_type=config.prediction_type,
        clip_range=config.clip_sample_range if config.clip_sample else None,
        variance=variance,
    )


def ddim_needs_noise(plan: DDIMPlan, i: int, eta: float) -> bool:
    """Whether step i adds variance noise: for every step when eta > 0, never when eta = 0."""
    plan.check_index(i)
    return eta > 0


def ddim_step(
    plan: DDIMPlan,
    i: int,
    x: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    *,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM update (eq. 12) from x = x_t at `plan.timesteps[i]` to x_prev.

    x0 and eps are the model's predictions from `to_x0_eps`. With clip_sample, x0 is clamped here;
    eps is kept as predicted, so the direction term uses the unclipped eps (as diffusers does by
    default). `noise` is z in eq. 12: required when `ddim_needs_noise(plan, i, eta)`, else ignored.
    The arithmetic runs in x0/eps's dtype on their device; the plan's values enter as scalars.
    """
    i = plan.check_index(i)
    if eta < 0:
        raise ValueError(f"eta={eta!r} is invalid; it must be >= 0 (0: DDIM, 1: DDPM variance)")
    if plan.clip_range is not None:
        x0 = x0.clamp(-plan.clip_range, plan.clip_range)
    alpha_bar_prev = plan.alpha_bar_prev[i]
    sigma = eta * plan.variance[i] ** 0.5
    # 1 - alpha_bar_prev - sigma^2 is exactly 0 for eta = 1 at alpha_bar_t = 0 (zero terminal SNR),
    # but can round to a tiny negative number in float32; the floor keeps it from becoming NaN.
    direction_variance = (1 - alpha_bar_prev - sigma**2).clamp(min=0)
    x_prev = alpha_bar_prev**0.5 * x0 + direction_variance**0.5 * eps
    if ddim_needs_noise(plan, i, eta):
        x_prev = x_prev + sigma * require_noise(noise, x, "ddim", i)
    return x_prev
