"""Noise schedules and stateless samplers on one contract (schedulers/contract.py).

A generation (pipelines/loop.py runs it):

    sampler  = get_sampler("dpmpp_2m_karras")        # (stepper, spacing)
    plan     = sampler.make_plan(schedule, num_steps)
    denoiser = make_denoiser(guided_model, schedule, prediction_type)
    x, carry = noise * plan.init_noise_sigma, None
    for i in range(len(plan)):
        z = tuple(draw() for _ in range(sampler.noise_draws(plan, i, eta)))
        x, carry = sampler.step(denoiser, plan, i, x, carry, z, eta=eta)

img2img starts part-way down (tail.py): plan = sampler.strength_plan(schedule, num_steps, strength)
and x = sampler.noised(plan, x0, z) before the same loop; inpainting re-imposes the known region
after step i with sampler.noised_to(plan, i + 1, x0, z).

Plans are immutable, steps are pure and the history is the caller's `carry`, so one sampler serves
any number of concurrent generations.
"""

from __future__ import annotations

import functools

from .contract import (
    Carry,
    Denoiser,
    ModelFn,
    Noise,
    Plan,
    Sampler,
    SigmaPlan,
    Stepper,
    make_denoiser,
    sigma_table,
    sigma_to_t,
)
from .ddim import DDIMPlan, ddim_needs_noise, ddim_plan, ddim_step
from .ddpm import DDPMPlan, ddpm_needs_noise, ddpm_plan, ddpm_step
from .diffusers_adapter import PREFIX as DIFFUSERS_PREFIX
from .diffusers_adapter import diffusers_sampler
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
from .lcm import LCM
from .spacing import SIGMA_SPACINGS, sigma_plan
from .steppers import (
    DPM2,
    DPMPP2M,
    DPMPP2MSDE,
    DPMPPSDE,
    LMS,
    DDIM,
    DDPM,
    DPM2Ancestral,
    DPMPP2SAncestral,
    Euler,
    EulerAncestral,
    Heun,
)
from .tail import strength_start
from .unipc import UniPC


# UniPC and LCM also step at integer training timesteps, on plans of their own.
_VP_STEPPERS = (DDIM, DDPM, UniPC(), LCM())
_SIGMA_STEPPERS = (Euler(), EulerAncestral(), Heun(), DPM2(), DPM2Ancestral(), LMS(), DPMPP2M(),
                   DPMPP2MSDE(), DPMPPSDE(), DPMPP2SAncestral())


def _registry() -> dict[str, Sampler]:
    """Every name: "ddim", "ddpm", and each sigma stepper alone (the model's timestep spacing)
    and with each sigma spacing: "euler", "euler_karras", "euler_exponential", ... (ComfyUI's
    sampler x scheduler grid, A1111's "DPM++ 2M Karras")."""
    out = {s.name: Sampler(name=s.name, stepper=s, spacing=None) for s in _VP_STEPPERS}
    for s in _SIGMA_STEPPERS:
        out[s.name] = Sampler(name=s.name, stepper=s, spacing=None)
        for spacing in SIGMA_SPACINGS:
            name = f"{s.name}_{spacing}"
            out[name] = Sampler(name=name, stepper=s, spacing=spacing)
    return out


SAMPLERS: dict[str, Sampler] = _registry()
# Built on first use, then shared (a Sampler is frozen; its plans hold private scheduler copies).
_diffusers_by_name = functools.lru_cache(maxsize=64)(diffusers_sampler)


def get_sampler(name: str) -> Sampler:
    """The sampler of a name; ValueError listing the valid names for an unknown one.

    ``"diffusers:<SchedulerClass>"`` or a diffusers scheduler instance is wrapped by
    schedulers.diffusers_adapter (each generation steps its own copy); a Sampler is itself."""
    if isinstance(name, Sampler):
        return name
    if isinstance(name, str) and name.startswith(DIFFUSERS_PREFIX):
        return _diffusers_by_name(name)
    if hasattr(name, "set_timesteps") and hasattr(name, "step"):
        return diffusers_sampler(name)
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        valid = ", ".join(SAMPLERS)
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {valid}") from None


__all__ = [
    "SAMPLERS",
    "SIGMA_SPACINGS",
    "Carry",
    "Denoiser",
    "ModelFn",
    "Noise",
    "Plan",
    "SigmaPlan",
    "Stepper",
    "make_denoiser",
    "sigma_plan",
    "sigma_table",
    "sigma_to_t",
    "strength_start",
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
