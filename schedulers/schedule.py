"""The training noise schedule, the forward process, and the one model-output adapter.

Notation (DDPM, Ho et al. 2020): beta_t is the variance added at training step t,
alpha_t = 1 - beta_t and alpha_bar_t = prod_{s<=t} alpha_s, so that (eq. 4)
q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I). Timesteps are 0-based, t in [0, T),
as in diffusers and the released SD checkpoints.

Every number here is computed with the same float32 operations, in the same order, as diffusers'
DDIMScheduler / DDPMScheduler, so that a checkpoint trained with diffusers samples bit-for-bit the
same with this engine.
"""

from __future__ import annotations

import json
import math
import operator
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

import numpy as np
import torch

Prediction = Literal["epsilon", "v_prediction", "sample"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
Spacing = Literal["leading", "trailing", "linspace"]
VarianceType = Literal["fixed_small", "fixed_large"]


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule plus the sampling options diffusers keeps beside it.

    Defaults reproduce Stable Diffusion 1.x (`scheduler/scheduler_config.json` of SD 1.4/1.5), not
    the defaults of diffusers' scheduler classes.
    """

    # SD was trained with T = 1000 discrete noise levels (DDPM's choice).
    num_train_timesteps: int = 1000
    # LDM (Rombach et al. 2022) trains with beta running from 0.00085 to 0.012, a lower end point
    # than DDPM's 0.02 because latents are already compact.
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # LDM spaces sqrt(beta) linearly ("scaled_linear"), not beta itself.
    beta_schedule: BetaSchedule = "scaled_linear"
    # SD 1.x predicts the noise eps; SD 2.x 768-v predicts v.
    prediction_type: Prediction = "epsilon"
    # SD 1.x's shipped config has no timestep_spacing key, so diffusers uses its default "leading".
    timestep_spacing: Spacing = "leading"
    # SD 1.x ships steps_offset=1: leading timesteps are 1, 21, 41, ... rather than 0, 20, 40, ...
    steps_offset: int = 1
    # SD 1.x ships False: DDIM's last step lands on alpha_bar_0 (t = 0), not on alpha_bar = 1.
    set_alpha_to_one: bool = False
    # Latents are not confined to [-1, 1], so SD never clips the predicted x0.
    clip_sample: bool = False
    # Half-width of the x0 clip when clip_sample is on (pixel-space models use [-1, 1]).
    clip_sample_range: float = 1.0
    # DDPM sampling with sigma_t^2 = beta_tilde_t (Ho et al. eq. 7), the smaller of Sec. 3.2's two.
    variance_type: VarianceType = "fixed_small"
    # SD 1.x and 2.x were trained without the zero-terminal-SNR fix of Lin et al. 2024.
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        _check_int("num_train_timesteps", self.num_train_timesteps, minimum=1)
        _check_int("steps_offset", self.steps_offset, minimum=0)
        for name in ("beta_start", "beta_end", "clip_sample_range"):
            _check_number(name, getattr(self, name))
        if not 0.0 <= self.beta_start < 1.0:
            raise ValueError(f"beta_start={self.beta_start!r} is invalid; it must lie in [0, 1)")
        if not 0.0 < self.beta_end < 1.0:
            raise ValueError(f"beta_end={self.beta_end!r} is invalid; it must lie in (0, 1)")
        if self.beta_start > self.beta_end:
            raise ValueError(
                f"beta_start={self.beta_start!r} is larger than beta_end={self.beta_end!r}; "
                "the noise variance must grow with t"
            )
        if not self.clip_sample_range > 0.0:
            raise ValueError(
                f"clip_sample_range={self.clip_sample_range!r} is invalid; it must be > 0"
            )
        for name in ("set_alpha_to_one", "clip_sample", "rescale_betas_zero_snr"):
            if not isinstance(getattr(self, name), bool):
                value = getattr(self, name)
                raise ValueError(f"{name}={value!r} is invalid; valid values: true, false")
        _check_choice("beta_schedule", self.beta_schedule, BetaSchedule)
        _check_choice("prediction_type", self.prediction_type, Prediction)
        _check_choice("timestep_spacing", self.timestep_spacing, Spacing)
        _check_choice("variance_type", self.variance_type, VarianceType)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScheduleConfig:
        """Read a diffusers `scheduler_config.json` dict of any SD scheduler class (DDIM, DDPM,
        PNDM, Euler, ...). Keys this config does not model are ignored; missing keys take the
        SD 1.x defaults above. Raises ValueError naming the field for a bad or unsupported value."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a scheduler config must be a JSON object, got {type(d).__name__}")
        # The keys below would change the schedule or the update in ways this package does not
        # implement. Every other key it does not model (_class_name, skip_prk_steps,
        # use_karras_sigmas, solver_order, ...) only matters to some other sampler and is ignored.
        if d.get("trained_betas") is not None:
            raise ValueError(
                "trained_betas is not supported: only schedules given by beta_start, beta_end and "
                "beta_schedule are implemented (expected trained_betas=null or no such key)"
            )
        if d.get("thresholding", False) is not False:
            raise ValueError(
                f"thresholding={d['thresholding']!r} is not supported: dynamic thresholding of x0 "
                "(Imagen) is not implemented (expected thresholding=false or no such key)"
            )
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self, class_name: str = "DDIMScheduler") -> dict[str, Any]:
        """A diffusers config dict, accepted by `DDIMScheduler.from_config` and
        `DDPMScheduler.from_config`, that reproduces this schedule. Every field is written,
        including those the target class does not take: diffusers silently drops keys that belong
        to a compatible scheduler class."""
        return {"_class_name": class_name, **asdict(self), "trained_betas": None}


def load_schedule_config(path: str | os.PathLike) -> ScheduleConfig:
    """Read a diffusers `scheduler_config.json`; `path` may also be the directory that holds it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "scheduler_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"scheduler config not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    try:
        return ScheduleConfig.from_dict(d)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _check_choice(name: str, value: Any, choices: Any) -> None:
    valid = get_args(choices)
    if value not in valid:
        raise ValueError(f"{name}={value!r} is invalid; valid values: {', '.join(valid)}")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid; it must be an integer >= {minimum}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is invalid; it must be a finite number")


@dataclass(frozen=True, eq=False)
class TrainSchedule:
    """beta_t and alpha_bar_t for t in [0, T), float32 on the CPU. The tensors are read-only."""

    config: ScheduleConfig
    betas: torch.Tensor  # (T,)
    alphas_cumprod: torch.Tensor  # (T,) alpha_bar_t, DDPM eq. 4


def train_schedule(config: ScheduleConfig) -> TrainSchedule:
    """beta_t from `config`, computed exactly as diffusers does, and alpha_bar_t (DDPM eq. 4)."""
    T = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":
        sqrt_start, sqrt_end = config.beta_start**0.5, config.beta_end**0.5
        betas = torch.linspace(sqrt_start, sqrt_end, T, dtype=torch.float32) ** 2
    else:
        betas = _cosine_betas(T)
    if config.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return TrainSchedule(config=config, betas=betas, alphas_cumprod=alphas_cumprod)


def _cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(u) = cos^2((u + s) / (1 + s) * pi / 2), u = t / T,
    and beta_t = 1 - alpha_bar(t + 1) / alpha_bar(t), capped at 0.999 so the last step stays
    finite. Evaluated in float64 and rounded once to float32, as diffusers does."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((t + 1) / T) / alpha_bar(t / T), max_beta) for t in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(alpha_bar) so that sqrt(alpha_bar_0) is
    kept and sqrt(alpha_bar_{T-1}) becomes 0 (zero SNR at the last step), then undo the cumprod."""
    sqrt_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def _per_sample(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1): a per-sample coefficient broadcast over `like`'s trailing dims."""
    return coef.flatten().reshape(-1, *([1] * (like.ndim - 1)))


def _sqrt_alpha_bars(
    schedule: TrainSchedule, like: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # Like diffusers, the square roots are taken in the sample's dtype (bf16 in bf16 training).
    alphas_cumprod = schedule.alphas_cumprod.to(device=like.device, dtype=like.dtype)
    alpha_bar = alphas_cumprod[timesteps.to(like.device)]
    return _per_sample(alpha_bar**0.5, like), _per_sample((1 - alpha_bar) ** 0.5, like)


def add_noise(
    schedule: TrainSchedule, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """Sample q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I) (DDPM eq. 4) with the given
    noise: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps. `timesteps` is (B,) int64."""
    sqrt_alpha_bar, sqrt_one_minus_alpha_bar = _sqrt_alpha_bars(schedule, x0, timesteps)
    return sqrt_alpha_bar * x0 + sqrt_one_minus_alpha_bar * noise


def velocity(
    schedule: TrainSchedule, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The v-prediction target of Salimans & Ho 2022 (Sec. 4 / App. D):
    v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0."""
    sqrt_alpha_bar, sqrt_one_minus_alpha_bar = _sqrt_alpha_bars(schedule, x0, timesteps)
    return sqrt_alpha_bar * noise - sqrt_one_minus_alpha_bar * x0


def to_x0_eps(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alpha_bar_t: float | torch.Tensor,
    prediction_type: Prediction,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn an eps-, v- or x0-predicting network's output into the (x0, eps) every sampler uses.

    All three invert x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps (DDPM eq. 4):
      epsilon:       x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)       (DDPM eq. 15)
      sample:        eps = (x_t - sqrt(alpha_bar) x0) / sqrt(1 - alpha_bar)
      v_prediction:  x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v,      (Salimans & Ho 2022)
                     eps = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x_t

    `alpha_bar_t` is a python float, a 0-d tensor, a (B,) tensor (one value per sample) or a tensor
    broadcastable to x_t such as (B, 1, 1, 1); it is read as float32, the dtype diffusers keeps
    alpha_bar in. The square roots are taken in float32 and the products in x_t's dtype, as in
    diffusers' steps. In float32 every form of alpha_bar_t gives bit-identical results.
    """
    _check_choice("prediction_type", prediction_type, Prediction)
    alpha_bar = torch.as_tensor(alpha_bar_t).to(torch.float32)
    sqrt_alpha_bar, sqrt_one_minus_alpha_bar = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    if alpha_bar.ndim > 0:
        # A 0-d coefficient acts as a scalar and leaves the result in x_t's dtype; a shaped one
        # would promote a bf16 x_t to float32, so it is cast to x_t's dtype and device first.
        if alpha_bar.ndim == 1 and x_t.ndim > 1:
            sqrt_alpha_bar = _per_sample(sqrt_alpha_bar, x_t)
            sqrt_one_minus_alpha_bar = _per_sample(sqrt_one_minus_alpha_bar, x_t)
        sqrt_alpha_bar = sqrt_alpha_bar.to(device=x_t.device, dtype=x_t.dtype)
        sqrt_one_minus_alpha_bar = sqrt_one_minus_alpha_bar.to(device=x_t.device, dtype=x_t.dtype)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - sqrt_one_minus_alpha_bar * eps) / sqrt_alpha_bar
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x_t - sqrt_alpha_bar * x0) / sqrt_one_minus_alpha_bar
    else:
        x0 = sqrt_alpha_bar * x_t - sqrt_one_minus_alpha_bar * model_output
        eps = sqrt_alpha_bar * model_output + sqrt_one_minus_alpha_bar * x_t
    return x0, eps


class StepIndexed:
    """What every plan shares: one step per entry of `timesteps`, and the index check."""

    # Model calls per user-facing step (diffusers' scheduler `order`): 2 for diffusers'
    # HeunDiscrete / KDPM2 through the adapter, whose plans have one step per call; else 1.
    calls_per_step = 1

    def __len__(self) -> int:
        return self.timesteps.shape[0]

    def check_index(self, i: int) -> int:
        """Validate a step index (0 <= i < len(plan)) and return it as an int."""
        i = operator.index(i)
        if not 0 <= i < len(self):
            raise IndexError(f"step index {i} is out of range for a plan of {len(self)} steps")
        return i


@dataclass(frozen=True, eq=False)
class SamplingPlan(StepIndexed):
    """What a sampler needs for one generation of `len(plan)` steps: computed once, on the CPU.

    Step i calls the model at `timesteps[i]` (noise level `alpha_bar[i]`) and moves the sample to
    the noise level `alpha_bar_prev[i]`, i.e. to timestep `prev_timesteps[i]` (negative: past the
    clean end, where the sampler's final-step rule gives alpha_bar_prev). Samplers extend this with
    their own per-step coefficients. The tensors are read-only.
    """

    timesteps: torch.Tensor  # (N,) int64, strictly decreasing, in [0, T)
    prev_timesteps: torch.Tensor  # (N,) int64, < timesteps, negative past the end
    alpha_bar: torch.Tensor  # (N,) float32
    alpha_bar_prev: torch.Tensor  # (N,) float32, >= alpha_bar
    prediction_type: Prediction  # what the model predicts; pass it to to_x0_eps
    clip_range: float | None  # clamp x0 to [-clip_range, clip_range] inside the step; None: no clip

    @property
    def init_noise_sigma(self) -> float:
        """The scale of the starting noise x_T = 1 * z: a VP plan starts at unit variance."""
        return 1.0



def check_num_steps(schedule: TrainSchedule, num_steps: int) -> int:
    """Validate a step count: 1 <= num_steps <= num_train_timesteps."""
    n = operator.index(num_steps)
    T = schedule.config.num_train_timesteps
    if not 1 <= n <= T:
        raise ValueError(
            f"num_steps={n} is invalid; it must be between 1 and num_train_timesteps={T}"
        )
    return n


def inference_timesteps(config: ScheduleConfig, num_steps: int) -> torch.Tensor:
    """The N timesteps at which the model is called, descending, as diffusers' `set_timesteps` picks
    them (Lin et al. 2024, Table 2), with numpy's float64 arithmetic and round-half-to-even:

      leading:  t_k = k * (T // N) + steps_offset                 for k = N-1, ..., 0
      trailing: t_k = round(T - k * T / N) - 1                      for k = 0, ..., N-1
      linspace: t_k = round(linspace(0, T - 1, N))[N-1-k]

    steps_offset only moves "leading" timesteps. For some N (61, 103, ... with T = 1000) diffusers'
    `arange` overshoots by one and appends a spurious t = -1 to the trailing list; it is dropped.
    """
    T, N = config.num_train_timesteps, num_steps
    if config.timestep_spacing == "leading":
        timesteps = np.arange(0, N)[::-1] * (T // N) + config.steps_offset
    elif config.timestep_spacing == "trailing":
        timesteps = np.round(np.arange(T, 0, -T / N))[:N].astype(np.int64) - 1
    else:
        timesteps = np.linspace(0, T - 1, N).round()[::-1]
    timesteps = torch.from_numpy(np.ascontiguousarray(timesteps, dtype=np.int64))
    if int(timesteps[0]) >= T:
        raise ValueError(
            f"timestep_spacing='leading' with steps_offset={config.steps_offset} puts the first of "
            f"{N} steps at t={int(timesteps[0])}, outside [0, {T}); use fewer steps"
        )
    return timesteps


def alpha_bar_at(
    schedule: TrainSchedule, timesteps: torch.Tensor, before_start: float | torch.Tensor
) -> torch.Tensor:
    """alpha_bar at each timestep, `before_start` where the timestep is negative. (N,) float32."""
    alpha_bar = schedule.alphas_cumprod[timesteps.clamp(min=0)]
    before_start = torch.as_tensor(before_start, dtype=torch.float32)
    return torch.where(timesteps >= 0, alpha_bar, before_start)


def require_noise(
    noise: torch.Tensor | None, x: torch.Tensor, sampler: str, i: int
) -> torch.Tensor:
    """The caller's variance noise for a step that needs it, on x's device and in x's dtype."""
    if noise is None:
        raise ValueError(
            f"{sampler} step {i} adds variance noise, but noise=None; draw it from your generator "
            f"whenever {sampler}_needs_noise(plan, i, eta) is true and pass it as noise="
        )
    if noise.shape != x.shape:
        raise ValueError(
            f"noise has shape {tuple(noise.shape)} but the sample has shape {tuple(x.shape)}"
        )
    return noise.to(device=x.device, dtype=x.dtype)
