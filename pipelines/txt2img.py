"""Text to image: start from pure noise at the plan's first timestep and denoise."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ldm_engine.errors import UserInputError
from schedulers import get_sampler, train_schedule

from .base import GenerationResult, Pipeline, as_prompt_list, make_generators
from .loop import denoise, per_image_noise
from .params import GenerationParams, check_request


class TextToImage(Pipeline):
    """``TextToImage.from_folder(path)(prompt, ...)`` -> GenerationResult."""

    @torch.inference_mode()
    def __call__(self, prompt: str | Sequence[str], *,
                 negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 sampler: str = "ddim", eta: float = 0.0,
                 height: int | None = None, width: int | None = None,
                 num_images_per_prompt: int = 1, seed: int | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 progress: bool = True) -> GenerationResult:
        c = self.components
        f = c.vae_factor
        height = c.unet.config.sample_size * f if height is None else height
        width = c.unet.config.sample_size * f if width is None else width
        # Every input error is raised here, before a single network call.
        check_request(steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler,
                      eta=eta, height=height, width=width, vae_factor=f)
        prompts = as_prompt_list(prompt)
        negatives = as_prompt_list("" if negative_prompt is None else negative_prompt,
                                   "negative prompt")
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise UserInputError(
                f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one or one each")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise UserInputError(
                f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        k = num_images_per_prompt
        prompts = [p for p in prompts for _ in range(k)]        # p1, p1, p2, p2 (diffusers order)
        negatives = [p for p in negatives for _ in range(k)]
        n = len(prompts)
        generators, seeds = make_generators(n, seed, generator)
        chosen = get_sampler(sampler)
        schedule = train_schedule(c.schedule)
        plan = chosen.make_plan(schedule, num_inference_steps)

        guidance = self.guidance(prompts, negatives, guidance_scale)
        shape = (n, c.latent_channels, height // f, width // f)
        # Latents and sampler arithmetic in fp32 whatever the networks' dtype (see speed.Accelerated).
        latents = per_image_noise(shape, generators, device=self.device, dtype=torch.float32)
        latents = denoise(guidance.model(self.denoiser()), latents, sampler=chosen, plan=plan,
                          prediction_type=c.schedule.prediction_type, generators=generators,
                          eta=eta, progress=progress)
        pixels = self.decode(latents)
        params = [GenerationParams(prompt=p, negative_prompt=q, steps=num_inference_steps,
                                   guidance_scale=guidance_scale, sampler=sampler, eta=eta,
                                   height=height, width=width, seed=s, model=self.name)
                  for p, q, s in zip(prompts, negatives, seeds)]
        return GenerationResult(self.to_pil(pixels), pixels.cpu(), latents.float().cpu(), params)

    def regenerate(self, params: GenerationParams, *, progress: bool = True) -> GenerationResult:
        """Make the image a GenerationParams (e.g. read back from a PNG) describes."""
        return self(params.prompt, negative_prompt=params.negative_prompt,
                    num_inference_steps=params.steps, guidance_scale=params.guidance_scale,
                    sampler=params.sampler, eta=params.eta, height=params.height,
                    width=params.width, seed=params.seed, progress=progress)
