"""Text to image: start from pure noise at the plan's first timestep and denoise."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence

import torch

from ldm_engine.errors import UserInputError
from schedulers import get_sampler, make_denoiser, train_schedule

from .base import GenerationResult, Pipeline, as_prompt_list, make_generators
from .loop import denoise, per_image_noise
from .params import GenerationParams, check_request
from .pnginfo import InexactRemakeWarning, check_storable


class TextToImage(Pipeline):
    """``TextToImage.from_folder(path)(prompt, ...)`` -> GenerationResult."""

    @torch.inference_mode()
    def __call__(self, prompt: str | Sequence[str], *,
                 negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 sampler: str = "ddim", eta: float | str = "auto",
                 height: int | None = None, width: int | None = None,
                 num_images_per_prompt: int = 1, seed: int | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 progress: bool = True, allow_large: bool = False,
                 clip_skip: int = 1) -> GenerationResult:
        """Generate; every input error is raised before a single network call.

        Prompts are read with AUTOMATIC1111's syntax (pipelines.prompts): ``(word:1.3)``
        weights, ``BREAK``, any length in 75-token windows. clip_skip: condition on the N-th
        text-encoder layer from the end, A1111's numbering (1 = the last layer; diffusers'
        clip_skip=1 is our 2).

        allow_large lifts the size limits of ldm_engine.limits (side and area relative to the
        model's native size, images per call) and checks the memory estimate against the
        device's total memory rather than what is free now.
        """
        c = self.components
        f = c.vae_factor
        native = c.unet.config.sample_size * f
        height = native if height is None else height
        width = native if width is None else width
        if not isinstance(allow_large, bool):
            raise UserInputError(f"allow_large must be True or False, got {allow_large!r}")
        prompts = as_prompt_list(prompt)
        negatives = as_prompt_list("" if negative_prompt is None else negative_prompt,
                                   "negative prompt")
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise UserInputError(
                f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one or one each")
        # What the PNG's parameters chunk could not hold exactly is refused now, not at save.
        check_storable(prompts)
        check_storable(negatives, "negative prompt")
        # A bool is an int to Python: True would silently mean one image.
        if (not isinstance(num_images_per_prompt, numbers.Integral)
                or isinstance(num_images_per_prompt, bool) or num_images_per_prompt < 1):
            raise UserInputError(
                f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        k = int(num_images_per_prompt)
        n = len(prompts) * k
        if c.unet.config.in_channels != c.vae.config.latent_channels:
            raise UserInputError(
                f"this UNet reads {c.unet.config.in_channels} channels (an inpainting or otherwise "
                f"conditioned model); text to image needs one that reads the VAE's "
                f"{c.vae.config.latent_channels} latent channels")
        # eta "auto": the sampler's own (0 for DDIM and the ODE samplers, 1 for ancestral / SDE).
        if isinstance(eta, str) and eta == "auto":
            eta = default_eta(sampler)
        check_request(steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler,
                      eta=eta, height=height, width=width, vae_factor=f,
                      seed=seed if generator is None else None, num_images=n,
                      schedule=c.schedule, clip_skip=clip_skip,
                      text_layers=c.text_encoder.config.num_hidden_layers)
        self.check_generation_size(height=height, width=width, num_images=n,
                                   guided=guidance_scale != 1.0, allow_large=allow_large)
        # Checked numbers (numpy scalars included) as plain Python ones from here on.
        num_inference_steps, height, width = int(num_inference_steps), int(height), int(width)
        guidance_scale, eta = float(guidance_scale), float(eta)
        prompts = [p for p in prompts for _ in range(k)]        # p1, p1, p2, p2 (diffusers order)
        negatives = [p for p in negatives for _ in range(k)]
        generators, seeds = make_generators(n, seed, generator)
        chosen = get_sampler(sampler)
        schedule = train_schedule(c.schedule)
        plan = chosen.make_plan(schedule, num_inference_steps)

        guidance = self.guidance(prompts, negatives, guidance_scale, int(clip_skip))
        shape = (n, c.latent_channels, height // f, width // f)
        # Latents and sampler arithmetic in fp32 whatever the networks' dtype (see speed.Accelerated).
        latents = per_image_noise(shape, generators, device=self.device, dtype=torch.float32)
        if plan.init_noise_sigma != 1.0:    # sigma samplers start at x = sigma_max z
            latents = latents * plan.init_noise_sigma
        denoiser = make_denoiser(guidance.model(self.denoiser()), schedule,
                                 c.schedule.prediction_type)
        latents = denoise(denoiser, latents, sampler=chosen, plan=plan, generators=generators,
                          eta=eta, progress=progress)
        pixels = self.decode(latents)
        made_with = dict(self.pixel_settings(), model=self.name, model_hash=self.model_hash)
        params = [GenerationParams(prompt=p, negative_prompt=q, steps=num_inference_steps,
                                   guidance_scale=guidance_scale, sampler=chosen.name, eta=eta,
                                   height=height, width=width, seed=s,
                                   clip_skip=int(clip_skip), **made_with)
                  for p, q, s in zip(prompts, negatives, seeds)]
        return GenerationResult(self.to_pil(pixels), pixels.cpu(), latents.float().cpu(), params)

    def regenerate(self, params: GenerationParams, *, progress: bool = True,
                   allow_large: bool = False) -> GenerationResult:
        """Make the image a GenerationParams (e.g. read back from a PNG) describes.

        The model, its dtype and the approximations are fixed when the pipeline is loaded; load
        it with ``from_folder(path, dtype=params.dtype, deep_cache=params.deep_cache,
        vae_tiling=params.vae_tiling)`` to match them (the CLI's --from-image does). Where this
        pipeline differs, the image is still made, with an InexactRemakeWarning naming how.
        """
        result = self(params.prompt, negative_prompt=params.negative_prompt,
                      num_inference_steps=params.steps, guidance_scale=params.guidance_scale,
                      sampler=params.sampler, eta=params.eta, height=params.height,
                      width=params.width, seed=params.seed, progress=progress,
                      allow_large=allow_large, clip_skip=params.clip_skip)
        differences = _differences(params, result.params[0])
        if differences:
            warnings.warn(InexactRemakeWarning(
                f"this pipeline differs from what made the image ({'; '.join(differences)}): "
                "the image will differ"), stacklevel=2)
        return result


def default_eta(sampler) -> float:
    """The eta a sampler runs with when none is given: 1 for the ancestral and SDE samplers
    (AUTOMATIC1111's "Eta for ancestral samplers" default), else 0 (deterministic)."""
    try:
        return get_sampler(sampler).default_eta
    except ValueError:
        return 0.0  # an unknown name: check_request reports it


def _differences(wanted: GenerationParams, made: GenerationParams) -> list[str]:
    """How an image made with `made` can differ from the one `wanted` describes."""
    out = []
    # An 8-digit hash is A1111's pre-2023 one (of 64 KiB of the file): not comparable.
    if len(wanted.model_hash) == len(made.model_hash) and wanted.model_hash != made.model_hash:
        out.append(f"model hash {made.model_hash}, the image's is {wanted.model_hash}")
    for field in ("dtype", "deep_cache", "vae_tiling"):
        if getattr(wanted, field) != getattr(made, field):
            out.append(f"{field} {getattr(made, field)}, the image's is {getattr(wanted, field)}")
    return out
