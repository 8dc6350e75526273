"""Text to image: start from pure noise at the plan's first noise level and denoise; with the
hires fix, upscale the result and denoise it again, image to image, at the larger size."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ldm_engine.errors import UserInputError

from .base import GenerationResult, Pipeline
from .modes import Batch, Mode, Start, requests_for
from .img2img import noised_start
from .observe import Observer
from .params import GenerationParams, HiresFix, check_steps


def inpainting_channels(pipe: Pipeline) -> int:
    """How many conditioning channels the UNet reads after the latents: 0 for a plain UNet,
    5 (mask + masked-image latents) for an SD inpainting UNet; anything else is refused."""
    c = pipe.components
    extra = c.unet.config.in_channels - c.vae.config.latent_channels
    if extra not in (0, 1 + c.vae.config.latent_channels):
        raise UserInputError(
            f"this UNet reads {c.unet.config.in_channels} channels; the engine runs UNets that "
            f"read the VAE's {c.vae.config.latent_channels} latent channels, or those plus a mask "
            f"and masked-image latents ({2 * c.vae.config.latent_channels + 1}: inpainting)")
    return extra


def blank_conditioning(pipe: Pipeline, n: int, height: int, width: int) -> torch.Tensor:
    """An inpainting UNet's extra channels when there is no image: repaint everything (mask 1)
    over the latents of a mid-grey image (0 in [-1, 1]), as AUTOMATIC1111 conditions such a
    UNet for text to image. (n, 1 + C, h, w) float32."""
    grey = torch.zeros(1, 3, height, width)
    masked = pipe.encode(grey)                          # the posterior mean: no randomness
    mask = torch.ones(1, 1, *masked.shape[2:], device=masked.device)
    return torch.cat([mask, masked], dim=1).repeat(n, 1, 1, 1)


class TextToImageMode(Mode):
    name = "txt2img"
    request = GenerationParams

    def largest(self, pipe, request, height, width):
        if request.hires is None:
            return height, width
        return request.hires.size(height, width, pipe.components.vae_factor)

    def check(self, pipe: Pipeline, batch: Batch) -> None:
        inpainting_channels(pipe)
        hires = batch.first.hires
        if hires is not None:
            h, w = hires.size(batch.height, batch.width, pipe.components.vae_factor)
            if (h, w) == (batch.height, batch.width):
                raise UserInputError(f"hires scale {hires.scale} leaves {batch.width}x"
                                     f"{batch.height} unchanged; use a larger scale")
            # The second pass's plan must exist too (steps against the training timesteps).
            try:
                check_steps(hires.steps or batch.first.steps, batch.first.sampler,
                            pipe.components.schedule)
            except UserInputError as e:
                raise UserInputError(f"hires {e}") from None

    def prepare(self, pipe: Pipeline, batch: Batch) -> Start:
        c = pipe.components
        f = c.vae_factor
        plan = batch.plan()
        shape = (c.latent_channels, batch.height // f, batch.width // f)
        # Pure noise at the first level: z for VP plans, sigma_max z for sigma plans.
        latents = batch.noise(shape, pipe.device) * plan.init_noise_sigma
        conditioning = (blank_conditioning(pipe, len(batch), batch.height, batch.width)
                        if inpainting_channels(pipe) else None)
        hires = batch.first.hires
        then = None if hires is None else (lambda x: hires_pass(pipe, batch, hires, x))
        return Start(latents=latents, plan=plan, conditioning=conditioning, then=then,
                     passes=1 if hires is None else 2)


# A1111's latent upscalers and the torch interpolation mode each one is.
_LATENT_MODES = {"latent": "bilinear", "latent-bicubic": "bicubic", "latent-nearest": "nearest"}


def hires_pass(pipe: Pipeline, batch: Batch, hires: HiresFix, latents: torch.Tensor) -> Start:
    """The hires fix's second pass: upscale the first pass's latents (or its decoded pixels,
    with Lanczos) to hires.size(...), then noise them to hires.strength and denoise the tail of
    a hires.steps plan, as image to image does."""
    c = pipe.components
    f = c.vae_factor
    height, width = hires.size(batch.height, batch.width, f)
    if hires.upscaler in _LATENT_MODES:
        mode = _LATENT_MODES[hires.upscaler]
        kw = {} if mode == "nearest" else {"align_corners": False}
        x0 = F.interpolate(latents, size=(height // f, width // f), mode=mode, **kw)
    else:
        from PIL import Image

        from .images import to_tensor

        # Decode, resize the 8-bit images with Lanczos (A1111's "Lanczos" upscaler), encode.
        images = [im.resize((width, height), Image.Resampling.LANCZOS)
                  for im in pipe.to_pil(pipe.decode(latents))]
        x0 = pipe.encode(torch.cat([to_tensor(im) for im in images]), batch.generators)
    conditioning = (blank_conditioning(pipe, len(batch), height, width)
                    if inpainting_channels(pipe) else None)
    steps = hires.steps or batch.first.steps
    x, plan, _ = noised_start(pipe, batch, x0, hires.strength, steps)
    return Start(latents=x, plan=plan, conditioning=conditioning, passes=2)


class TextToImage(Pipeline):
    """``TextToImage.from_folder(path)(prompt, ...)`` -> GenerationResult."""

    MODE = TextToImageMode()

    def __call__(self, prompt: str | Sequence[str], *,
                 negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 sampler: str | None = None, eta: float | str | None = None,
                 height: int | None = None, width: int | None = None,
                 num_images_per_prompt: int = 1, seed: int | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 progress: bool = True, allow_large: bool = False,
                 clip_skip: int | None = None, hires: HiresFix | None = None,
                 observer: Observer | Sequence[Observer] | None = None,
                 rerank: int | None = None, rerank_batch: int | None = None
                 ) -> GenerationResult:
        """Generate; every input error is raised before a single network call.

        Builds one GenerationParams per prompt (whose defaults are the only defaults: None here
        means "the request's") and runs them as one batch (Pipeline.run). Prompts are read with
        AUTOMATIC1111's syntax (pipelines.prompts): ``(word:1.3)`` weights, ``BREAK``, any
        length in 75-token windows. clip_skip: condition on the N-th text-encoder layer from the
        end, A1111's numbering (1 = the last layer; diffusers' clip_skip=1 is our 2). eta None
        or "auto": the sampler's own. hires: a HiresFix for a second, larger pass. rerank: make
        that many candidates per image and keep the one CLIP finds closest to the prompt
        (pipelines.rerank; at most rerank_batch generated at once).

        allow_large lifts the size limits of ldm_engine.limits (side and area relative to the
        model's native size, images per call) and checks the memory estimate against the
        device's total memory rather than what is free now.
        """
        requests = requests_for(
            GenerationParams, prompt, negative_prompt, seed, num_images_per_prompt,
            steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler,
            eta=None if eta == "auto" else eta, height=height, width=width,
            clip_skip=clip_skip, hires=hires, rerank=rerank)
        return self.run(requests, num_images=num_images_per_prompt, generator=generator,
                        observer=observer, progress=progress, allow_large=allow_large,
                        rerank_batch=rerank_batch)


def default_eta(sampler) -> float:
    """The eta a sampler runs with when none is given: 1 for the ancestral and SDE samplers
    (AUTOMATIC1111's "Eta for ancestral samplers" default), else 0 (deterministic)."""
    from schedulers import get_sampler
    try:
        return get_sampler(sampler).default_eta
    except ValueError:
        return 0.0  # an unknown name: check_request reports it
