"""Any diffusers scheduler as a stepper of this engine's loop: ``sampler="diffusers:<Class>"``.

diffusers' schedulers are mutable objects (``set_timesteps`` rewrites them, ``step`` advances a
hidden ``_step_index`` and, for multistep methods, appends to ``model_outputs``), and its docs warn
that one instance must not serve two generations at once. The adapter keeps them off the shared
path:

- the plan holds a *template*: a private copy of the scheduler on which ``set_timesteps(N)`` has
  run, never touched again;
- step i works on a deep copy of the previous step's scheduler (the template at i = 0) and returns
  that copy as the carry. Nothing a generation owns is shared, and calling a step twice with the
  same carry gives the same result, as for every other stepper.

One plan step is one ``scheduler.step`` call, i.e. one model call, so second-order schedulers
(HeunDiscrete, KDPM2Discrete: 2N - 1 timesteps for N steps) have plans longer than N; the
diffusers pipeline's loop is followed literally: ``x_in = scale_model_input(x, t)``,
``out = model(x_in, t)``, ``x = step(out, t, x).prev_sample``, starting from
``z * init_noise_sigma``.

Randomness: a scheduler whose ``step`` takes a ``generator`` is given one noise draw per step from
the loop's per-image generators, and that draw seeds one fresh CPU generator per image (a hash of
the image's own noise row) which is passed to ``step``. So the adapter is deterministic per seed
and images of a batch stay independent, but the stream is not the one the diffusers pipeline would
draw from the same seed (it is for deterministic schedulers, which ignore it).

A class named by string is built with ``from_config`` from the model's typed schedule config
(schedulers.ScheduleConfig), offline; the class's other options keep their defaults. An instance
passed in is used with its own configuration (its training schedule must be the model's).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import re
from dataclasses import dataclass
from typing import Any

import torch

from .contract import Carry, Denoiser, Noise, Sampler, check_noise
from .schedule import StepIndexed, Prediction, TrainSchedule, check_num_steps
from .tail import check_start, check_x0_noise, ve_sigma

PREFIX = "diffusers:"
_CLASS_NAME = re.compile(r"[A-Z][A-Za-z0-9]*Scheduler")


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class called `name` (e.g. EulerDiscreteScheduler)."""
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None) if _CLASS_NAME.fullmatch(name) else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"diffusers has no scheduler class {name!r}; give a class name such "
                         "as diffusers:EulerDiscreteScheduler or "
                         "diffusers:DPMSolverMultistepScheduler")
    return cls


@dataclass(frozen=True, eq=False)
class DiffusersPlan(StepIndexed):
    """A scheduler after set_timesteps (read-only: steps copy it) and what the loop reads."""

    template: Any
    timesteps: torch.Tensor       # (len,) the scheduler's timesteps, one per model call
    init_noise_sigma: float
    prediction_type: Prediction
    draws_noise: bool             # step() takes a generator
    # scheduler.order: model calls per inference step (2 for HeunDiscrete / KDPM2Discrete).
    calls_per_step: int = 1
    # Index of this plan's first step in the template's own timesteps (a tail's start).
    begin: int = 0


@dataclass(frozen=True, eq=False)
class DiffusersStepper:
    """contract.Stepper over one diffusers scheduler class (built from the model's config) or
    one instance (used as configured; never mutated)."""

    name: str
    scheduler_cls: type | None = None
    instance: Any = None
    space: str = "diffusers"
    default_eta: float = 0.0

    def make_plan(self, schedule: TrainSchedule, num_steps: int,
                  spacing: str | None) -> DiffusersPlan:
        if spacing is not None:
            raise ValueError(f"{self.name} takes its spacing from the scheduler's own config; "
                             f"there is no {spacing!r} variant")
        n = check_num_steps(schedule, num_steps)
        if self.instance is not None:
            template = copy.deepcopy(self.instance)
            _check_same_training_schedule(template, schedule, self.name)
        else:
            template = self.scheduler_cls.from_config(dataclasses.asdict(schedule.config))
        template.set_timesteps(n, device="cpu")
        params = inspect.signature(template.step).parameters
        prediction = getattr(template.config, "prediction_type", schedule.config.prediction_type)
        return DiffusersPlan(template=template, timesteps=template.timesteps.clone(),
                             init_noise_sigma=float(template.init_noise_sigma),
                             prediction_type=prediction, draws_noise="generator" in params,
                             calls_per_step=int(getattr(template, "order", 1)))

    def noise_draws(self, plan: DiffusersPlan, i: int, eta: float) -> int:
        plan.check_index(i)
        return int(plan.draws_noise)

    def model_calls(self, plan: DiffusersPlan, i: int) -> int:
        plan.check_index(i)
        return 1

    def step(self, denoiser: Denoiser, plan: DiffusersPlan, i: int, x: torch.Tensor,
             carry: Carry, noise: Noise, *, eta: float) -> tuple[torch.Tensor, Carry]:
        i = plan.check_index(i)
        noise = check_noise(noise, self.noise_draws(plan, i, eta), x, self.name, i)
        if i > 0 and carry is None:
            raise ValueError(f"{self.name} step {i} needs the carry returned by step {i - 1}")
        scheduler = copy.deepcopy(plan.template if carry is None else carry)
        t = plan.timesteps[i].to(x.device)
        out = denoiser.model(scheduler.scale_model_input(x, t), t)
        kwargs = {}
        params = inspect.signature(scheduler.step).parameters
        if "eta" in params:
            kwargs["eta"] = eta
        if noise:
            kwargs["generator"] = _generators_from(noise[0])
        x_next = scheduler.step(out, t, x, return_dict=True, **kwargs).prev_sample
        return x_next, scheduler


    def tail(self, plan: DiffusersPlan, start: int) -> DiffusersPlan:
        """What diffusers' img2img does, on a private copy of the template: the loop's
        timesteps sliced, and set_begin_index(begin) where the scheduler has it (so its step
        index, sigmas and multistep warm-up start there); schedulers without it (DDIM, DDPM)
        look their coefficients up by timestep. `start` counts plan steps (model calls)."""
        start = check_start(plan, start)
        if start == 0:
            return plan
        template = copy.deepcopy(plan.template)
        begin = plan.begin + start
        if hasattr(template, "set_begin_index"):
            template.set_begin_index(begin)
        return dataclasses.replace(plan, template=template, timesteps=plan.timesteps[start:],
                                   begin=begin)

    def noised(self, plan: DiffusersPlan, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """template.add_noise(x0, z, timesteps[:1]) on a copy (add_noise moves the scheduler's
        tables to x0's device), one timestep per sample as the img2img pipeline passes them."""
        if len(plan) == 0:
            return x0
        noise = check_x0_noise(x0, noise)
        scheduler = copy.deepcopy(plan.template)
        timesteps = plan.timesteps[:1].repeat(x0.shape[0])
        return scheduler.add_noise(x0, noise, timesteps)

    def level(self, plan: DiffusersPlan, i: int) -> float:
        """The scheduler's own sigma at its step index begin + i where it keeps a sigma per
        step (the Euler and DPM-Solver families), else sqrt((1 - alpha_bar_t) / alpha_bar_t)."""
        if i == len(plan):
            return 0.0
        sigmas = getattr(plan.template, "sigmas", None)
        if isinstance(sigmas, torch.Tensor) and sigmas.ndim == 1 and plan.begin + i < len(sigmas):
            return float(sigmas[plan.begin + i])
        t = int(plan.timesteps[i])
        return ve_sigma(plan.template.alphas_cumprod[t])


def _generators_from(z: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per image, seeded by a hash of that image's noise row."""
    rows = z.detach().to("cpu", torch.float32).contiguous()
    seeds = [int.from_bytes(hashlib.blake2b(r.numpy().tobytes(), digest_size=8).digest(), "big")
             for r in rows]
    return [torch.Generator().manual_seed(s) for s in seeds]


def _check_same_training_schedule(scheduler: Any, schedule: TrainSchedule, name: str) -> None:
    theirs = getattr(scheduler, "alphas_cumprod", None)
    if theirs is None:
        return
    ours = schedule.alphas_cumprod
    if theirs.shape != ours.shape or not torch.allclose(theirs.float(), ours, rtol=1e-5, atol=0):
        raise ValueError(f"the {name} instance was configured with another training noise "
                         "schedule than the model's (betas / num_train_timesteps differ)")


def diffusers_sampler(scheduler: str | Any) -> Sampler:
    """The Sampler of ``"diffusers:<Class>"`` or of a diffusers scheduler instance."""
    if isinstance(scheduler, str):
        if not scheduler.startswith(PREFIX):
            raise ValueError(f"{scheduler!r} is not a diffusers:<SchedulerClass> name")
        cls = scheduler_class(scheduler[len(PREFIX):])
        stepper = DiffusersStepper(name=scheduler, scheduler_cls=cls)
    else:
        from diffusers import SchedulerMixin

        if not isinstance(scheduler, SchedulerMixin):
            raise ValueError(f"expected a diffusers scheduler instance, got {type(scheduler)!r}")
        stepper = DiffusersStepper(name=PREFIX + type(scheduler).__name__,
                                   instance=copy.deepcopy(scheduler))
    return Sampler(name=stepper.name, stepper=stepper, spacing=None)
