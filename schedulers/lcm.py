"""Latent Consistency Model sampling (Luo et al. 2023, "Latent Consistency Models", Alg. 1 of the
multistep consistency sampler), as a frozen plan and a pure step: diffusers' LCMScheduler.

An LCM-distilled UNet is a consistency function f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t)
(paper eq. 9, with the boundary condition f(x, 0) = x: c_skip(0) = 1, c_out(0) = 0), where x0 is
the network's data prediction (DDPM eq. 4 inverted) and, with sigma_data = 0.5 and the distilled
timestep scaled by timestep_scaling = 10 (diffusers' LCMScheduler defaults, what LCM checkpoints
ship),

    c_skip(t) = sigma_data^2 / ((10 t)^2 + sigma_data^2)
    c_out(t)  = 10 t / sqrt((10 t)^2 + sigma_data^2).

Multistep sampling (Alg. 1): denoise with f, then re-noise to the next timestep,
    x_{t'} = sqrt(alpha_bar_{t'}) f(x_t, t) + sqrt(1 - alpha_bar_{t'}) z,   z ~ N(0, I),
with no re-noising after the last step (the image is f itself). z is one draw per step but the
last, taken by the loop from the per-image generators (exactly diffusers' randn_tensor order).

Timesteps: LCM's own spacing, not the model's timestep_spacing. The distillation ran on the
skipping-step grid t = k (T // 50) - 1, k = 1..50 (original_inference_steps = 50); N steps take
N evenly spaced indices of that grid from the top: floor(linspace(0, 50, N, endpoint=False)).
So N is at most 50. Per-step scalars are computed with diffusers' float32 tensor operations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .contract import Carry, Denoiser, Noise, check_eta, check_noise
from .schedule import StepIndexed, Prediction, TrainSchedule, check_num_steps
from .tail import VPTail

ORIGINAL_INFERENCE_STEPS = 50  # the distillation grid of the released LCM checkpoints
TIMESTEP_SCALING = 10.0        # LCMScheduler's default: sharpens c_skip / c_out around t = 0
SIGMA_DATA = 0.5


@dataclass(frozen=True, eq=False)
class LCMPlan(StepIndexed):
    """Timesteps and per-step 0-d float32 scalars of one LCM generation (read-only)."""

    timesteps: torch.Tensor                  # (N,) int64, strictly decreasing
    prediction_type: Prediction
    clip_range: float | None
    alpha_bar: torch.Tensor                  # (N,) float32 at timesteps[i] (forward noising)
    sqrt_alpha_bar: tuple[torch.Tensor, ...]       # at timesteps[i]
    sqrt_one_minus: tuple[torch.Tensor, ...]       # sqrt(1 - alpha_bar) at timesteps[i]
    c_skip: tuple[torch.Tensor, ...]
    c_out: tuple[torch.Tensor, ...]
    # Re-noising to timesteps[i + 1] (unused at the last step).
    sqrt_alpha_bar_next: tuple[torch.Tensor, ...]
    sqrt_one_minus_next: tuple[torch.Tensor, ...]

    @property
    def init_noise_sigma(self) -> float:
        return 1.0


def lcm_timesteps(schedule: TrainSchedule, n: int) -> np.ndarray:
    """LCMScheduler.set_timesteps (strength 1): N of the 50 distillation timesteps."""
    T = schedule.config.num_train_timesteps
    k = T // ORIGINAL_INFERENCE_STEPS
    if n > ORIGINAL_INFERENCE_STEPS or k < 1:
        raise ValueError(f"lcm takes at most {min(ORIGINAL_INFERENCE_STEPS, T)} steps (the "
                         f"distillation grid of {ORIGINAL_INFERENCE_STEPS} timesteps), got {n}")
    grid = (np.asarray(list(range(1, ORIGINAL_INFERENCE_STEPS + 1))) * k - 1)[::-1].copy()
    index = np.floor(np.linspace(0, len(grid), num=n, endpoint=False)).astype(np.int64)
    return grid[index]


def lcm_plan(schedule: TrainSchedule, num_steps: int) -> LCMPlan:
    n = check_num_steps(schedule, num_steps)
    timesteps = torch.from_numpy(lcm_timesteps(schedule, n)).to(torch.int64)
    alphas_cumprod = schedule.alphas_cumprod
    config = schedule.config
    if config.prediction_type == "epsilon" and float(alphas_cumprod[timesteps[0]]) == 0.0:
        # x0 = (x - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) has no value at zero SNR.
        raise ValueError("lcm starts at t = T - 1, where this zero-terminal-SNR schedule has "
                         "alpha_bar = 0: an eps-predicting model cannot be sampled there "
                         "(zero-SNR models predict v)")
    sab, som, cs, co, sab_next, som_next = [], [], [], [], [], []
    for i in range(n):
        t = timesteps[i]
        t_next = timesteps[i + 1] if i + 1 < n else t
        a, a_next = alphas_cumprod[t], alphas_cumprod[t_next]
        sab.append(a.sqrt())
        som.append((1 - a).sqrt())
        sab_next.append(a_next.sqrt())
        som_next.append((1 - a_next).sqrt())
        # Boundary-condition scalings (paper eq. 9), on the 0-d int64 timestep as diffusers'
        # pipeline passes it: t * 10.0 is a float32 tensor.
        scaled = t * TIMESTEP_SCALING
        cs.append(SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2))
        co.append(scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5)
    return LCMPlan(timesteps=timesteps, prediction_type=config.prediction_type,
                   clip_range=config.clip_sample_range if config.clip_sample else None,
                   alpha_bar=alphas_cumprod[timesteps], sqrt_alpha_bar=tuple(sab), sqrt_one_minus=tuple(som), c_skip=tuple(cs),
                   c_out=tuple(co), sqrt_alpha_bar_next=tuple(sab_next),
                   sqrt_one_minus_next=tuple(som_next))


@dataclass(frozen=True)
class LCM(VPTail):
    """The LCM stepper (contract.Stepper), for LCM-distilled UNets (LCM or LCM-LoRA).

    Its tail is the plain tail of the txt2img plan (each step is self-contained); diffusers' LCM
    img2img instead re-plans with set_timesteps(N, strength), which thins the distillation grid
    to int(50 strength) timesteps first."""

    name: str = "lcm"
    space: str = "vp"
    default_eta: float = 0.0

    def make_plan(self, schedule: TrainSchedule, num_steps: int, spacing: str | None) -> LCMPlan:
        if spacing is not None:
            raise ValueError(f"lcm steps on its own distillation timesteps; it has no "
                             f"{spacing!r} variant")
        return lcm_plan(schedule, num_steps)

    def noise_draws(self, plan: LCMPlan, i: int, eta: float) -> int:
        """One re-noising draw per step but the last, whatever eta (it is part of the method)."""
        i = plan.check_index(i)
        return int(i < len(plan) - 1)

    def model_calls(self, plan: LCMPlan, i: int) -> int:
        plan.check_index(i)
        return 1

    def step(self, denoiser: Denoiser, plan: LCMPlan, i: int, x: torch.Tensor, carry: Carry,
             noise: Noise, *, eta: float) -> tuple[torch.Tensor, Carry]:
        i = plan.check_index(i)
        check_eta(eta, self.name)
        noise = check_noise(noise, self.noise_draws(plan, i, eta), x, self.name, i)
        dev = x.device
        out = denoiser.model(x, plan.timesteps[i].to(dev))
        a, s = plan.sqrt_alpha_bar[i].to(dev), plan.sqrt_one_minus[i].to(dev)
        if plan.prediction_type == "epsilon":
            x0 = (x - s * out) / a
        elif plan.prediction_type == "v_prediction":
            x0 = a * x - s * out
        else:
            x0 = out
        if plan.clip_range is not None:
            x0 = x0.clamp(-plan.clip_range, plan.clip_range)
        # f(x_t, t) = c_out x0 + c_skip x_t  (paper eq. 9)
        denoised = plan.c_out[i].to(dev) * x0 + plan.c_skip[i].to(dev) * x
        if not noise:
            return denoised, None
        x_next = (plan.sqrt_alpha_bar_next[i].to(dev) * denoised
                  + plan.sqrt_one_minus_next[i].to(dev) * noise[0])
        return x_next, None
