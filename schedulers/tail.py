"""Starting part-way down a plan: img2img's strength, plan tails, and forward noising to a level.

img2img, inpainting and hires fix do not start from pure noise: they noise a clean latent x0 to
the noise level of some step `start` and run the plan's remaining steps start..N-1 (SDEdit,
Meng et al. 2022, Sec. 3: perturb to t0 with the forward process, then solve the reverse process
from t0). With diffusers' convention (StableDiffusionImg2ImgPipeline.get_timesteps),

    init_timestep = min(int(N strength), N),   t_start = max(N - init_timestep, 0),

so strength 1 runs every step and a small strength runs few (none when N strength < 1: the
output is then the input).

Forward noising (DDPM eq. 4) in the space a stepper steps in:

    VP  (DDIM, DDPM, LCM):  x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) z
    VE  (k-diffusion):      x   = x0 + sigma z,   sigma = sqrt((1 - alpha_bar) / alpha_bar)

The two are the same point up to the scale sqrt(alpha_bar) (contract.py, "Spaces").
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import torch

from ldm_engine.errors import UserInputError


def strength_start(num_steps: int, strength: float) -> int:
    """t_start, the first step img2img runs for `strength` in (0, 1] over `num_steps` steps
    (diffusers' get_timesteps: t_start = max(N - min(int(N strength), N), 0))."""
    n = operator.index(num_steps)
    if n < 1:
        raise UserInputError(f"num_steps={num_steps!r} is invalid; it must be an integer >= 1")
    if (isinstance(strength, bool) or not isinstance(strength, (int, float))
            or not math.isfinite(strength) or not 0 < strength <= 1):
        raise UserInputError(f"strength={strength!r} is invalid; it must be a number in (0, 1] "
                             "(1 starts from pure noise, small values keep more of the image)")
    init_timestep = min(int(n * strength), n)
    return max(n - init_timestep, 0)


def check_start(plan: Any, start: int, what: str = "start") -> int:
    """A step index in [0, len(plan)] (len(plan): past the last step, the clean end), as an int."""
    n = len(plan)
    if isinstance(start, bool):
        raise ValueError(f"{what}={start!r} is invalid; it must be an integer in [0, {n}]")
    try:
        start = operator.index(start)
    except TypeError:
        raise ValueError(f"{what}={start!r} is invalid; it must be an integer in [0, {n}]") from None
    if not 0 <= start <= n:
        raise ValueError(f"{what}={start} is out of range for a plan of {n} steps; "
                         f"it must lie in [0, {n}]")
    return start


def slice_steps(plan: Any, start: int) -> Any:
    """The plan of steps start..N-1, for frozen plans whose per-step fields simply slice.

    Every tensor with a leading axis and every tuple field holds one entry per step (N entries:
    timesteps, alpha_bar, per-step coefficients) or per level (N + 1: sigmas, whose last entry is
    the clean end), so [start:] keeps exactly the steps from `start` and the levels they visit.
    Scalar fields (prediction_type, clip_range, spacing) are kept. start = 0 is the plan itself;
    start = N leaves no steps.
    """
    start = check_start(plan, start)
    if start == 0:
        return plan
    n = len(plan)
    changes = {}
    for f in dataclasses.fields(plan):
        value = getattr(plan, f.name)
        if isinstance(value, tuple) or (isinstance(value, torch.Tensor) and value.ndim >= 1):
            if len(value) not in (n, n + 1):
                raise TypeError(f"{type(plan).__name__}.{f.name} has {len(value)} entries for a "
                                f"plan of {n} steps; slice_steps cannot tell what to keep")
            changes[f.name] = value[start:]
    return dataclasses.replace(plan, **changes)


def check_x0_noise(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The noise for forward-noising x0, on x0's device and in x0's dtype."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but x0 has shape "
                         f"{tuple(x0.shape)}; draw one standard-normal tensor of x0's shape")
    return noise.to(device=x0.device, dtype=x0.dtype)


def vp_noised(alpha_bar: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) z (DDPM eq. 4) at one level alpha_bar (a
    (1,) float32 tensor), with diffusers' DDIM/DDPM/LCM add_noise arithmetic: alpha_bar cast to
    the sample's dtype first, both square roots taken in that dtype (bf16 latents: bf16 roots)."""
    noise = check_x0_noise(x0, noise)
    alpha_bar = alpha_bar.to(device=x0.device, dtype=x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise


def ve_noised(sigma: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x = x0 + sigma z (EDM eq. 1) at one level sigma (a 0-d or (1,) float32 tensor), as
    diffusers' Euler-family add_noise computes it (sigma in the sample's dtype)."""
    noise = check_x0_noise(x0, noise)
    sigma = sigma.to(device=x0.device, dtype=x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return x0 + noise * sigma


def ve_sigma(alpha_bar: float) -> float:
    """The VE noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) of a VP level (inf at
    alpha_bar = 0, zero terminal SNR)."""
    alpha_bar = float(alpha_bar)
    return math.sqrt((1 - alpha_bar) / alpha_bar) if alpha_bar > 0 else math.inf


class VPTail:
    """tail / noised / level of the steppers whose plans carry alpha_bar per step (DDIM, DDPM,
    LCM): every per-step value slices (DDIM's t_prev = t - T // N keeps the full plan's stride
    and DDPM's t_prev is the next planned timestep, as in diffusers), and x0 is noised with DDPM
    eq. 4 at the first step's alpha_bar (diffusers' add_noise)."""

    def tail(self, plan, start: int):
        return slice_steps(plan, start)

    def noised(self, plan, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if len(plan) == 0:
            return x0
        return vp_noised(plan.alpha_bar[:1], x0, noise)

    def level(self, plan, i: int) -> float:
        return ve_sigma(plan.alpha_bar[i]) if i < len(plan) else 0.0
