"""What one generated image was made with, validated before any compute.

Its PNG form (the AUTOMATIC1111 ``parameters`` text) is in ``pipelines.pnginfo``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Literal

from ldm_engine.config_check import ModelShape
from ldm_engine.errors import UserInputError
from ldm_engine.limits import check_size
from schedulers import SAMPLERS, ScheduleConfig, get_sampler, train_schedule

from .prompts import check_clip_skip

# The networks' precision as GenerationParams records it (ldm_engine.precision.DTYPES' names).
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True, kw_only=True)
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    steps: int = 50
    guidance_scale: float = 7.5
    sampler: str = "ddim"
    eta: float = 0.0
    height: int = 512
    width: int = 512
    seed: int = 0
    # The model's folder name or file stem: shown in the PNG, never used to pick a model.
    model: str = ""
    # A1111's "Model hash": 10 hex digits of the SHA-256 of the weights (ldm_engine.modelhash);
    # "" when the networks were not loaded from files (e.g. sampling during training).
    model_hash: str = ""
    # What changes the pixels beyond A1111's fields, all fixed when a pipeline is loaded: the
    # networks' precision, and the two opt-in approximations (pipelines.speed.SpeedOptions).
    # The defaults are the exact image: fp32, deep UNet blocks at every step, one-piece decode.
    dtype: Precision = "fp32"
    deep_cache: int = 1
    vae_tiling: bool = False
    # A1111's "Clip skip": condition on the N-th text-encoder layer from the end (1 = the last).
    clip_skip: int = 1

    def validate(self, vae_factor: int = 8) -> None:
        check_request(steps=self.steps, guidance_scale=self.guidance_scale, sampler=self.sampler,
                      eta=self.eta, height=self.height, width=self.width, vae_factor=vae_factor,
                      clip_skip=self.clip_skip)

    def to_png_text(self) -> str:
        """The A1111 ``parameters`` text (see pipelines.pnginfo)."""
        from .pnginfo import format_parameters
        return format_parameters(self)

    @classmethod
    def from_png_text(cls, text: str) -> "GenerationParams":
        from .pnginfo import parse_parameters
        return parse_parameters(text)

    def replace(self, **changes) -> "GenerationParams":
        return dataclasses.replace(self, **changes)


def check_request(*, steps: int, guidance_scale: float, sampler: str, eta: float, height: int,
                  width: int, vae_factor: int = 8, seed: int | None = None, num_images: int = 1,
                  schedule: ScheduleConfig | None = None, shape: ModelShape | None = None,
                  allow_large: bool = False, clip_skip: int = 1,
                  text_layers: int | None = None) -> None:
    """Every input error the pipeline can know about before touching a network.

    Python values of the wrong type (a string guidance, a bool for a count) are refused here too,
    not left to fail inside torch. With the model's `schedule`, steps are checked against its
    training timesteps; with its `shape`, the size limits of ldm_engine.limits (the memory check
    needs the loaded pipeline: TextToImage does it). seed None means a random one. clip_skip
    is checked against `text_layers`, the text encoder's layer count, when given.
    """
    _check_count("steps", steps)
    for name, side in (("height", height), ("width", width)):
        _check_count(name, side)
        if side % vae_factor:
            lower = max(vae_factor, side - side % vae_factor)
            raise UserInputError(
                f"{name} {side} is not a multiple of {vae_factor} (the VAE's downsampling factor);"
                f" use {lower} or {lower + vae_factor}")
    _check_count("number of images", num_images)
    if not _is_real(guidance_scale) or not math.isfinite(guidance_scale):
        raise UserInputError(f"guidance scale must be a finite number, got {guidance_scale!r}")
    if not _is_real(eta) or not math.isfinite(eta) or eta < 0:
        raise UserInputError(f"eta must be a finite number >= 0, got {eta!r}")
    try:
        get_sampler(sampler)            # registry names, diffusers:<Class>, scheduler instances
    except ValueError as e:
        if isinstance(sampler, str) and sampler.startswith("diffusers:"):
            raise UserInputError(str(e)) from None
        raise UserInputError(
            f"unknown sampler {sampler!r}; valid samplers: {', '.join(sorted(SAMPLERS))}, "
            "diffusers:<SchedulerClass>") from None
    check_seed(seed, num_images)
    check_clip_skip(clip_skip, text_layers)
    if schedule is not None:
        check_steps(steps, sampler, schedule)
    if shape is not None:
        check_size(shape, height=height, width=width, num_images=num_images,
                   allow_large=allow_large)


def _is_real(x) -> bool:
    # numbers.Real covers numpy scalars; a bool is an int to Python but never a guidance scale.
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_count(name: str, value) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        raise UserInputError(f"{name} must be a positive integer, got {value!r}")


# torch.Generator.manual_seed takes a 64-bit seed; image j of a call uses seed + j.
SEED_LIMIT = 2**64


def check_seed(seed: int | None, num_images: int = 1) -> None:
    if seed is None:
        return
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise UserInputError(f"seed must be a non-negative integer, got {seed!r}")
    if seed + num_images - 1 >= SEED_LIMIT:
        top = SEED_LIMIT - num_images
        raise UserInputError(f"seed {seed} is too large: seeds are 64-bit and image k of a run "
                             f"uses seed + k, so at most {top} for {num_images} image"
                             f"{'s' if num_images > 1 else ''}")


def check_steps(steps: int, sampler: str, schedule: ScheduleConfig) -> None:
    """A step count the sampler can plan over the model's training schedule."""
    T = schedule.num_train_timesteps
    if steps > T:
        raise UserInputError(f"steps {steps} is more than the model's {T} training timesteps; "
                             f"use at most {T}")
    try:
        # Cheap (T numbers), and it catches the spacing's own edge cases: 'leading' spacing
        # with steps_offset 1 has no room for T steps (the first would be t = T).
        get_sampler(sampler).make_plan(train_schedule(schedule), steps)
    except ValueError as e:
        raise UserInputError(f"steps {steps} cannot be planned on this model's schedule: "
                             f"{e}") from None
