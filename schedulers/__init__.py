"""Noise schedules and stateless samplers.

A generation is `plan = sampler.make_plan(schedule, num_steps)`, then for i in range(len(plan)):

    out = model(x, plan.timesteps[i])
    x0, eps = to_x0_eps(out, x, plan.alpha_bar[i], plan.prediction_type)
    noise = draw(...) if sampler.needs_noise(plan, i, eta) else None
    x = sampler.step(plan, i, x, x0, eps, eta=eta, noise=noise)

Plans are immutable and steps are pure, so one sampler serves any number of concurrent generations.
"""

from __future__ import annotations

import ldm_engine  # noqa: F401  (first: sets torch's allocator options before torch loads)

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ddim import DDIMPlan, ddim_needs_noise, ddim_plan, ddim_step
from .ddpm import DDPMPlan, ddpm_needs_noise, ddpm_plan, ddpm_step
from .schedule import (
    BetaSchedule,
    Prediction,
    SamplingPlan,
    ScheduleConfig,
    Spacing,
    TrainSchedule,
    VarianceType,
    add_noise,
    load_schedule_config,
    to_x0_eps,
    train_schedule,
    velocity,
)


@dataclass(frozen=True)
class Sampler:
    name: str
    make_plan: Callable[[TrainSchedule, int], SamplingPlan]
    step: Callable[..., torch.Tensor]  # step(plan, i, x, x0, eps, *, eta, noise) -> x_prev
    needs_noise: Callable[[SamplingPlan, int, float], bool]


SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler(name="ddim", make_plan=ddim_plan, step=ddim_step, needs_noise=ddim_needs_noise),
    "ddpm": Sampler(name="ddpm", make_plan=ddpm_plan, step=ddpm_step, needs_noise=ddpm_needs_noise),
}


def get_sampler(name: str) -> Sampler:
    try:
        return SAMPLERS[name]
    except KeyError:
        valid = ", ".join(SAMPLERS)
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {valid}") from None


__all__ = [
    "SAMPLERS",
    "BetaSchedule",
    "DDIMPlan",
    "DDPMPlan",
    "Prediction",
    "Sampler",
    "SamplingPlan",
    "ScheduleConfig",
    "Spacing",
    "TrainSchedule",
    "VarianceType",
    "add_noise",
    "ddim_needs_noise",
    "ddim_plan",
    "ddim_step",
    "ddpm_needs_noise",
    "ddpm_plan",
    "ddpm_step",
    "get_sampler",
    "load_schedule_config",
    "to_x0_eps",
    "train_schedule",
    "velocity",
]
