"""Noise-level spacings for the sigma (k-diffusion) samplers: which sigma_0 > ... > sigma_N = 0.

A spacing is separate from the stepper (STYLE rule 13): "dpmpp_2m_karras" is dpmpp_2m over the
"karras" spacing. Spacings:

  None (the model's own)  the training timesteps diffusers' Euler family picks for the config's
                          timestep_spacing (leading / trailing / linspace, Lin et al. 2024 Table 2),
                          sigma linearly interpolated in t between training sigmas (integer t for
                          leading and trailing, so exact table values; fractional for linspace).
  karras                  Karras et al. 2022 (EDM) eq. 5, rho = 7:
                          sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho
  exponential             uniform in log sigma: sigma_i = exp(lerp(log s_max, log s_min, i/(N-1)))
  polyexponential         k-diffusion's: log sigma_i = (1 - i/(N-1))^rho (log s_max - log s_min)
                          + log s_min, rho = 1 (then equal to exponential, as in k-diffusion)
  normal                  k-diffusion's DiscreteSchedule.get_sigmas(N), ComfyUI's "normal" and
                          AUTOMATIC1111's "Automatic" for its k-samplers: t_i = linspace(T-1, 0, N)
                          and log sigma interpolated linearly between the neighbouring training
                          timesteps (float32, as k-diffusion computes it)

s_min / s_max are the training table's ends, sigma(t=0) and sigma(t=T-1), as k-diffusion and
AUTOMATIC1111 take them. (diffusers' use_karras_sigmas takes the ends of the sigmas its
timestep spacing picked, e.g. sigma(981) for 50 leading steps; the two agree for "linspace".)
The model timestep of each sigma is its log-sigma interpolation (contract.sigma_to_t).
sigma spacings are computed in float64, as diffusers does, and rounded once to float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .contract import SigmaPlan, sigma_table, sigma_to_t
from .schedule import TrainSchedule, check_num_steps

SIGMA_SPACINGS = ("karras", "exponential", "polyexponential", "normal")
KARRAS_RHO = 7.0
POLYEXPONENTIAL_RHO = 1.0


def _timestep_spaced(schedule: TrainSchedule, n: int) -> tuple[np.ndarray, np.ndarray]:
    """diffusers EulerDiscreteScheduler.set_timesteps: float timesteps and their sigmas."""
    config = schedule.config
    T = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    elif config.timestep_spacing == "leading":
        timesteps = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.float32)
        timesteps += config.steps_offset
    else:
        timesteps = np.arange(T, 0, -T / n).round().copy().astype(np.float32)[:n] - 1
    if timesteps[0] >= T:
        raise ValueError(
            f"timestep_spacing='leading' with steps_offset={config.steps_offset} puts the first of "
            f"{n} steps at t={int(timesteps[0])}, outside [0, {T}); use fewer steps")
    table = sigma_table(schedule).numpy()
    sigmas = np.interp(timesteps, np.arange(0, T), table)
    return timesteps, sigmas


def _normal(schedule: TrainSchedule, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k-diffusion's get_sigmas(n): (sigmas (n,), timesteps (n,)), float32."""
    log_sigmas = sigma_table(schedule).log()
    t = torch.linspace(log_sigmas.shape[0] - 1, 0, n)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp(), t


def spaced_sigmas(schedule: TrainSchedule, n: int, spacing: str) -> np.ndarray:
    """N float64 sigmas from s_max down to s_min for a sigma spacing (karras, ...)."""
    table = sigma_table(schedule)
    s_min, s_max = float(table[0]), float(table[-1])
    ramp = np.linspace(0, 1, n)
    if spacing == "karras":
        lo, hi = s_min ** (1 / KARRAS_RHO), s_max ** (1 / KARRAS_RHO)
        return (hi + ramp * (lo - hi)) ** KARRAS_RHO
    if spacing == "exponential":
        return np.exp(np.linspace(math.log(s_max), math.log(s_min), n))
    if spacing == "polyexponential":
        r = np.linspace(1, 0, n) ** POLYEXPONENTIAL_RHO
        return np.exp(r * (math.log(s_max) - math.log(s_min)) + math.log(s_min))
    raise ValueError(f"unknown spacing {spacing!r}; valid spacings: {', '.join(SIGMA_SPACINGS)}")


def sigma_plan(schedule: TrainSchedule, num_steps: int, spacing: str | None) -> SigmaPlan:
    """The SigmaPlan of num_steps steps for `spacing` (None: the model's timestep spacing)."""
    n = check_num_steps(schedule, num_steps)
    if spacing is None:
        timesteps, sigmas = _timestep_spaced(schedule, n)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]])).to(torch.float32)
        timesteps = torch.from_numpy(timesteps).to(torch.float32)
        name = schedule.config.timestep_spacing
    elif spacing == "normal":
        sigmas, timesteps = _normal(schedule, n)
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        name = spacing
    else:
        sigmas = torch.from_numpy(np.concatenate([spaced_sigmas(schedule, n, spacing), [0.0]]))
        sigmas = sigmas.to(torch.float32)
        timesteps = sigma_to_t(sigma_table(schedule).log(), sigmas[:-1])
        name = spacing
    if not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError(f"{n} steps of {name} spacing give repeated noise levels; use fewer steps")
    return SigmaPlan(sigmas=sigmas, timesteps=timesteps,
                     prediction_type=schedule.config.prediction_type, spacing=name)
