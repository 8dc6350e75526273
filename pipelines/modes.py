"""The mode contract: what Pipeline.run hands a mode (Batch), what a mode hands back (Start),
and the Mode base class every mode (pipelines.registry) subclasses.

A mode is "prepare + hook" (STYLE rule 15): it turns the checked per-image requests into the
starting latents at the plan's first level, the plan (for image modes its tail), and optionally
a step hook that changes the latents (inpainting) or extra UNet input channels; Pipeline.run does
everything else, the same way for every mode.
"""

from __future__ import annotations

import abc
import numbers
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ldm_engine.errors import UserInputError
from schedulers import Plan, Sampler, TrainSchedule

from .guidance import Guidance
from .loop import StepHook, per_image_noise
from .params import GenerationParams, check_seed

if TYPE_CHECKING:
    from .base import Pipeline


@dataclass(frozen=True, eq=False)
class Batch:
    """What Pipeline.run hands a mode: the per-image requests (each with its own seed; every
    other field but the prompts equal), checked, with their generators and the sampler."""

    requests: tuple[GenerationParams, ...]
    generators: list[torch.Generator]
    height: int                      # the generation size, resolved (mode.size)
    width: int
    eta: float                       # resolved: the sampler's own when the request has None
    sampler: Sampler
    schedule: TrainSchedule

    @property
    def first(self) -> GenerationParams:
        return self.requests[0]

    def __len__(self) -> int:
        return len(self.requests)

    def plan(self, steps: int | None = None) -> Plan:
        """The sampler's full plan of `steps` (default: the request's) steps."""
        return self.sampler.make_plan(self.schedule, self.first.steps if steps is None else steps)

    def noise(self, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        """One standard-normal draw per image from its own generator, (B, *shape), float32."""
        return per_image_noise((len(self), *shape), self.generators, device=device,
                               dtype=torch.float32)


@dataclass(frozen=True, eq=False)
class Start:
    """How a mode starts the one loop: latents at the plan's first noise level, the plan, and
    what else the run needs. `then` chains a second pass (hires fix); `finish` post-processes
    the decoded pixels (pasting an "only masked" crop back)."""

    latents: torch.Tensor                                 # (B, C, h, w) float32
    plan: Plan
    hook: StepHook | None = None
    # Extra UNet input channels, (B, k, h, w), concatenated after the latents at every call:
    # mask and masked-image latents for 9-channel inpainting UNets (never scaled by c_in).
    conditioning: torch.Tensor | None = None
    # The text conditioning when it is not the prompts' (interpolation, text-diff edits make
    # one per image); None: the batch's prompts and negative prompts.
    guidance: Guidance | None = None
    then: Callable[[torch.Tensor], "Start"] | None = None
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None
    passes: int = 1


def native_size(pipe: "Pipeline", request: GenerationParams) -> tuple[int, int]:
    """(height, width): the request's, else the model's native size (sample_size x factor)."""
    native = pipe.components.unet.config.sample_size * pipe.components.vae_factor
    return (native if request.height is None else request.height,
            native if request.width is None else request.width)


class Mode(abc.ABC):
    """One generation mode: what it adds to the shared Pipeline.run. Stateless; a subclass
    implements prepare and overrides what else it needs (pipelines.registry lists them)."""

    name: str = ""
    request: type = GenerationParams

    def expand(self, request: GenerationParams, num_images: int) -> list[GenerationParams]:
        """The per-image requests of one request: image j gets seed + j (A1111's rule, so it
        equals a single generation with that seed). Sequence modes (interpolation frames, edit
        amounts) make their own."""
        return [request.replace(seed=request.seed + j) for j in range(num_images)]

    def size(self, pipe: "Pipeline", request: GenerationParams) -> tuple[int, int]:
        """The generation's (height, width): the request's, else the model's native size."""
        return native_size(pipe, request)

    def shared(self, request: GenerationParams) -> GenerationParams:
        """What all images of one batch must share: everything but prompts and seed (and what
        a sequence mode sets per image)."""
        return request.replace(prompt="", negative_prompt="", seed=0)

    def largest(self, pipe: "Pipeline", request: GenerationParams, height: int,
                width: int) -> tuple[int, int]:
        """The largest (height, width) any pass generates at (for the size and memory limits)."""
        return height, width

    def check(self, pipe: "Pipeline", batch: Batch) -> None:
        """What only this mode can get wrong, checked before any compute."""

    @abc.abstractmethod
    def prepare(self, pipe: "Pipeline", batch: Batch) -> Start:
        """The starting latents at the plan's first level, the plan, and the rest of Start."""


def as_prompt_list(prompt: str | Sequence[str], what: str = "prompt") -> list[str]:
    """A prompt or a list of prompts as a list; anything else (5, None, bytes) is refused."""
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, Sequence) or isinstance(prompt, (bytes, bytearray)):
        raise UserInputError(f"{what} must be a string or a list of strings, "
                             f"got {type(prompt).__name__}")
    prompts = list(prompt)
    if not prompts:
        raise UserInputError(f"empty {what} list: give at least one {what}")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise UserInputError(f"every {what} must be a string, got {type(bad[0]).__name__}")
    return prompts


def requests_for(cls: type, prompt, negative_prompt, seed: int | None, num_images_per_prompt,
                 **fields) -> list[GenerationParams]:
    """One request per prompt for a diffusers-style call: negative prompts broadcast, fields
    left None take the request type's defaults, and prompt i is seeded seed + i * k, so that the
    batch's image j has seed + j (a random seed when None)."""
    prompts = as_prompt_list(prompt)
    negatives = as_prompt_list("" if negative_prompt is None else negative_prompt,
                               "negative prompt")
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise UserInputError(
            f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one or one each")
    k = num_images_per_prompt
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
        raise UserInputError(f"num_images_per_prompt must be a positive integer, got {k!r}")
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    check_seed(seed, len(prompts) * int(k))
    given = {name: value for name, value in fields.items() if value is not None}
    try:
        return [cls(prompt=p, negative_prompt=q, seed=int(seed) + i * int(k), **given)
                for i, (p, q) in enumerate(zip(prompts, negatives))]
    except TypeError as e:              # e.g. a keyword this mode does not have
        raise UserInputError(str(e)) from None


def check_count(name: str, value) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise UserInputError(f"{name} must be a positive integer, got {value!r}")
