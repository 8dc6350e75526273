"""The sampler contract: a denoiser, a plan, a pure stepper and a caller-threaded carry.

A sampler is a (stepper, spacing) pair over a denoiser (STYLE rule 13; Karras et al. 2022, "EDM",
Sec. 2-3, which separates the noise levels sigma_0 > ... > sigma_N = 0 from the ODE/SDE solver):

    sampler  = get_sampler("dpmpp_2m_karras")          # stepper dpmpp_2m, spacing karras
    plan     = sampler.make_plan(schedule, num_steps)  # frozen, computed once on the CPU
    denoiser = make_denoiser(guided_model, schedule, prediction_type)   # once per generation
    x        = noise * plan.init_noise_sigma
    carry    = None
    for i in range(len(plan)):
        noise = tuple(draw() for _ in range(sampler.noise_draws(plan, i, eta)))
        x, carry = sampler.step(denoiser, plan, i, x, carry, noise, eta=eta)

Everything a generation remembers lives in the values the caller holds (x, carry); the sampler,
the plan and the denoiser are immutable, so any number of generations share them.

Spaces. DDIM and DDPM step in the variance-preserving space of DDPM (Ho et al. 2020, eq. 4),
x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, at the integer training timesteps; the
k-diffusion family steps in the variance-exploding space x = x0 + sigma eps (EDM eq. 1), where
sigma = sqrt((1 - alpha_bar) / alpha_bar), so x_VE = x_VP / sqrt(alpha_bar)
= x_VP sqrt(sigma^2 + 1).
Both start from pure noise scaled by `plan.init_noise_sigma` (1 for VP plans, sigma_0 for sigma
plans) and both end at x0 (sigma = 0), so the loop never needs to know which space a stepper uses.

The denoiser D(x, sigma) -> x0 is k-diffusion's discrete-DDPM wrapper (external.py,
DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser), EDM Table 1's preconditioning with sigma_data = 1:

    c_in = 1 / sqrt(sigma^2 + 1)   (x c_in is the VP sample the UNet was trained on)
    t    = sigma_to_t(sigma)       (log-sigma interpolation between training timesteps)
    eps network:  x0 = x - sigma eps
    v network:    x0 = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v     (Salimans & Ho 2022)
    x0 network:   x0 = out

Karras / exponential noise levels fall between training timesteps; the UNet is then called at the
fractional timestep t whose log-sigma interpolates the training table (k-diffusion's sigma_to_t,
diffusers' `_sigma_to_t`), a float32 0-d tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from .schedule import Prediction, SamplingPlan, StepIndexed, TrainSchedule, to_x0_eps
from .tail import check_start, strength_start

# The guided network in its own parameterisation: (x_in (B,C,h,w), t 0-d tensor) -> output.
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# What a stepper remembers between steps (e.g. DPM++ 2M's previous x0): a frozen value or None.
Carry = Any
# Every noise draw of one step, in the order the stepper consumes them; each has x's shape.
Noise = tuple[torch.Tensor, ...]

# Zero-terminal-SNR schedules (Lin et al. 2024) have alpha_bar_{T-1} = 0, i.e. sigma_max = inf.
# Like diffusers' Euler/DPM schedulers, the sigma table clamps that alpha_bar to 2^-24
# (sigma_max ~ 4096): large enough that x = sigma_max z is pure noise to float32 precision.
ZERO_SNR_ALPHA_BAR = 2.0**-24


def sigma_table(schedule: TrainSchedule) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for t in [0, T), float32, ascending.

    A zero terminal alpha_bar is clamped to ZERO_SNR_ALPHA_BAR (see there)."""
    alpha_bar = schedule.alphas_cumprod
    if float(alpha_bar[-1]) == 0.0:
        alpha_bar = alpha_bar.clone()
        alpha_bar[-1] = ZERO_SNR_ALPHA_BAR
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


def sigma_to_t(log_sigmas: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The fractional training timestep of noise level `sigma` (any shape): piecewise-linear
    interpolation of t against log sigma_t, clamped to [0, T-1] (k-diffusion's
    DiscreteSchedule.sigma_to_t, float32). `log_sigmas` is log(sigma_table), ascending."""
    log_sigma = sigma.to(torch.float32).clamp(min=1e-10).log()
    dists = log_sigma - log_sigmas[:, None]
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high = low + 1
    lo, hi = log_sigmas[low], log_sigmas[high]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return ((1 - w) * low + w * high).view(sigma.shape)


@dataclass(frozen=True, eq=False)
class Denoiser:
    """D(x, sigma) -> x0 around one guided network, built once per generation (make_denoiser).

    `__call__` is the VE interface of the k-diffusion family; `vp` is the raw discrete call of
    the DDPM-space samplers (DDIM, DDPM), kept separate so they stay bit-exact with diffusers.
    """

    model: ModelFn
    prediction_type: Prediction
    sigmas: torch.Tensor      # (T,) float32 sigma_table(schedule), CPU
    log_sigmas: torch.Tensor  # (T,) float32, CPU

    def t_of(self, sigma: float) -> float:
        """The (fractional) model timestep of noise level sigma."""
        return float(sigma_to_t(self.log_sigmas, torch.tensor([sigma], dtype=torch.float32)))

    def __call__(self, x: torch.Tensor, sigma: float, t: float | None = None) -> torch.Tensor:
        """x0 predicted from the VE sample x = x0 + sigma eps. `t` is the model timestep of
        sigma when the plan has it (the spacings compute it once); else it is interpolated."""
        sigma = float(sigma)
        if not sigma > 0:
            raise ValueError(f"the denoiser needs a noise level sigma > 0, got {sigma!r}")
        t = self.t_of(sigma) if t is None else float(t)
        c_in = 1.0 / math.sqrt(sigma * sigma + 1.0)
        out = self.model(x * c_in, torch.tensor(t, dtype=torch.float32, device=x.device))
        if self.prediction_type == "epsilon":
            return x - sigma * out
        if self.prediction_type == "v_prediction":
            return x * (1.0 / (sigma * sigma + 1.0)) + out * (-sigma * c_in)
        return out

    def vp(self, x: torch.Tensor, t: int, alpha_bar: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from the VP sample x_t at integer timestep t with noise level alpha_bar
        (DDPM eq. 4 inverted by `to_x0_eps`)."""
        out = self.model(x, torch.tensor(int(t), dtype=torch.int64, device=x.device))
        return to_x0_eps(out, x, alpha_bar, self.prediction_type)


def make_denoiser(model: ModelFn, schedule: TrainSchedule, prediction_type: Prediction) -> Denoiser:
    """The denoiser of a guided network trained on `schedule` to predict `prediction_type`."""
    sigmas = sigma_table(schedule)
    return Denoiser(model=model, prediction_type=prediction_type, sigmas=sigmas,
                    log_sigmas=sigmas.log())


@dataclass(frozen=True, eq=False)
class SigmaPlan(StepIndexed):
    """The noise levels of one generation for the VE (k-diffusion) samplers.

    Step i moves x from sigmas[i] to sigmas[i + 1]; sigmas[-1] = 0. timesteps[i] is the model
    timestep of sigmas[i] (an integer for timestep spacings, fractional for sigma spacings).
    The tensors are read-only; `sigma` holds the same values as python floats.
    """

    sigmas: torch.Tensor      # (N+1,) float32, strictly decreasing, ending at 0
    timesteps: torch.Tensor   # (N,) float32
    prediction_type: Prediction
    spacing: str

    @property
    def init_noise_sigma(self) -> float:
        """x_N = sigmas[0] z (k-diffusion, A1111). diffusers' Euler family starts leading-spaced
        plans at sqrt(sigma_0^2 + 1) z instead; this engine follows k-diffusion."""
        return float(self.sigmas[0])

    @property
    def sigma(self) -> list[float]:
        return self.sigmas.tolist()

    def __len__(self) -> int:
        return self.sigmas.shape[0] - 1


Plan = SamplingPlan | SigmaPlan


@runtime_checkable
class Stepper(Protocol):
    """One sampling method. All methods are pure functions of their arguments.

    name          the community name of the method ("euler_a", "dpmpp_2m", ...)
    space         "vp" (plans are SamplingPlan, spacing fixed by the model's config) or
                  "sigma" (plans are SigmaPlan from a spacing)
    default_eta   the eta used when the caller gives none (0 for ODE solvers and DDIM,
                  1 for ancestral / SDE methods). eta scales the fresh noise of DDIM and the
                  ancestral / SDE methods; the ODE solvers (euler, heun, dpm2, lms, dpmpp_2m)
                  ignore it, as k-diffusion and AUTOMATIC1111 do; it must be a finite >= 0.
    """

    name: str
    space: str
    default_eta: float

    def make_plan(self, schedule: TrainSchedule, num_steps: int, spacing: str | None) -> Plan:
        """The frozen plan of num_steps steps; spacing None means the model's timestep spacing."""

    def noise_draws(self, plan: Plan, i: int, eta: float) -> int:
        """How many standard-normal tensors of x's shape step i consumes."""

    def model_calls(self, plan: Plan, i: int) -> int:
        """How many network (UNet) evaluations step i makes."""

    def step(self, denoiser: Denoiser, plan: Plan, i: int, x: torch.Tensor, carry: Carry,
             noise: Noise, *, eta: float) -> tuple[torch.Tensor, Carry]:
        """Step i: x at plan level i -> x at level i + 1, and the carry for step i + 1.

        carry is None at i = 0; noise holds exactly noise_draws(plan, i, eta) tensors."""

    def tail(self, plan: Plan, start: int) -> Plan:
        """The plan of steps start..N-1 (same type), to be run from i = 0 with carry None:
        multistep history starts afresh. start = 0: the plan itself; start = N: no steps."""

    def noised(self, plan: Plan, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x0 forward-noised with `noise` to the plan's first level, in the stepper's space
        (x0 itself for an empty plan)."""

    def level(self, plan: Plan, i: int) -> float:
        """The VE noise level sigma of step i's input, i in [0, N] (0 at i = N, the clean end)."""


@dataclass(frozen=True)
class Sampler:
    """A named (stepper, spacing) pair: "dpmpp_2m_karras" = (dpmpp_2m, "karras")."""

    name: str
    stepper: Stepper
    spacing: str | None  # None: the model's timestep spacing (leading / trailing / linspace)

    @property
    def default_eta(self) -> float:
        return self.stepper.default_eta

    def make_plan(self, schedule: TrainSchedule, num_steps: int) -> Plan:
        return self.stepper.make_plan(schedule, num_steps, self.spacing)

    def noise_draws(self, plan: Plan, i: int, eta: float) -> int:
        return self.stepper.noise_draws(plan, i, eta)

    def model_calls(self, plan: Plan, i: int) -> int:
        return self.stepper.model_calls(plan, i)

    def total_model_calls(self, plan: Plan) -> int:
        """UNet evaluations of a whole generation (guidance's batched pair counts once)."""
        return sum(self.model_calls(plan, i) for i in range(len(plan)))

    def step(self, denoiser: Denoiser, plan: Plan, i: int, x: torch.Tensor, carry: Carry,
             noise: Noise = (), *, eta: float) -> tuple[torch.Tensor, Carry]:
        return self.stepper.step(denoiser, plan, i, x, carry, tuple(noise), eta=eta)

    # Starting part-way down a plan (img2img, inpainting, hires fix; see tail.py).

    def tail(self, plan: Plan, start: int) -> Plan:
        """The plan of steps start..N-1, run from i = 0 with carry None: what diffusers' img2img
        runs after ``timesteps[t_start * order:]`` and ``set_begin_index``. Multistep methods
        (LMS, DPM++ 2M, UniPC) restart their history and warm-up order at the tail.
        ValueError unless 0 <= start <= len(plan)."""
        check_start(plan, start)
        return self.stepper.tail(plan, start)

    def strength_plan(self, schedule: TrainSchedule, num_steps: int, strength: float) -> Plan:
        """make_plan, then the tail img2img runs for `strength` in (0, 1] (tail.strength_start).
        A plan with several model calls per step (diffusers' HeunDiscrete: calls_per_step 2)
        starts at t_start * calls_per_step, as diffusers' get_timesteps slices by order."""
        t_start = strength_start(num_steps, strength)
        plan = self.make_plan(schedule, num_steps)
        return self.tail(plan, min(t_start * plan.calls_per_step, len(plan)))

    def noised(self, plan: Plan, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x0 forward-noised to the plan's first level (the starting latents of img2img over a
        tail): sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) z for VP plans, x0 + sigma z for sigma
        plans (DDPM eq. 4 in either space). x0 itself for an empty plan."""
        return self.stepper.noised(plan, x0, noise)

    def level(self, plan: Plan, i: int) -> float:
        """The VE noise level sigma of step i's input (sqrt((1 - alpha_bar) / alpha_bar) for VP
        plans); i = len(plan) is the clean end, 0."""
        return self.stepper.level(plan, check_start(plan, i, "i"))

    def noised_to(self, plan: Plan, i: int, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x0 noised to the level of step i's input; i = len(plan) means clean (x0 itself).

        Inpainting re-imposes the known region after step i with noised_to(plan, i + 1, ...), as
        diffusers' inpaint pipeline does with add_noise(image_latents, noise, timesteps[i + 1])."""
        i = check_start(plan, i, "i")
        if i == len(plan):
            return x0
        return self.noised(self.tail(plan, i), x0, noise)


def check_noise(noise: Noise, count: int, x: torch.Tensor, name: str, i: int) -> Noise:
    """The caller's draws for a step that consumes `count`, on x's device and in x's dtype."""
    if len(noise) != count:
        raise ValueError(f"{name} step {i} consumes {count} noise draw(s) but got {len(noise)}; "
                         f"pass noise_draws(plan, i, eta) standard-normal tensors")
    for z in noise:
        if z.shape != x.shape:
            raise ValueError(
                f"noise has shape {tuple(z.shape)} but the sample has shape {tuple(x.shape)}")
    return tuple(z.to(device=x.device, dtype=x.dtype) for z in noise)


def check_eta(eta: float, name: str) -> float:
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta={eta!r} is invalid for {name}; it must be a finite number >= 0")
    return float(eta)
