"""DDIM inversion of an image: the noise latent that deterministic DDIM maps back to it.

An image is encoded to its VAE posterior mean x0, and the DDIM plan's steps are run backwards from
x0 (schedulers.inverse: Song et al. 2021, eq. 12 reversed; Dhariwal & Nichol 2021, App. F;
Mokady et al. 2023) up to the level where the plan's strength tail starts. Sampling that tail with
DDIM at eta = 0 under the same text conditioning returns close to x0; how close is the
reconstruction PSNR. Both directions run through the one loop (pipelines.loop.denoise).

Classifier-free guidance makes the inverse map drift (each step's eps is extrapolated and the
linearisation error grows with the scale: Mokady et al. 2023, Sec. 3), so inversion is done at
guidance 1 by default. Null-text optimisation, which repairs that drift, is not done here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ldm_engine.errors import UserInputError
from schedulers import DDIMPlan, get_sampler, make_denoiser, strength_start, train_schedule
from schedulers.inverse import DDIM_INVERSE, ddim_inverse_plan

from .base import Pipeline
from .guidance import Guidance
from .loop import denoise
from .params import ResizeMode, _check_choice, check_request, check_strength

DDIM = get_sampler("ddim")


def guided_denoiser(pipe: Pipeline, guidance: Guidance, conditioning: torch.Tensor | None):
    """D(x, sigma) of the pipeline's UNet under `guidance`, as Pipeline.run builds it."""
    unet = pipe._conditioned(pipe.denoiser(), conditioning)
    c = pipe.components
    return make_denoiser(guidance.model(unet), train_schedule(c.schedule),
                         c.schedule.prediction_type)


def invert_latents(pipe: Pipeline, x0: torch.Tensor, plan: DDIMPlan, upto: int,
                   guidance: Guidance, conditioning: torch.Tensor | None = None) -> torch.Tensor:
    """x0 (B, C, h, w) carried up the inverse of DDIM steps N-1..upto of `plan` under the
    per-row text conditioning `guidance` (B rows): the latents at the first level of
    DDIM.tail(plan, upto). upto = len(plan) returns x0."""
    inverse = ddim_inverse_plan(plan, upto)
    if len(inverse) == 0:
        return x0
    # No draws are made (eta 0), but the loop wants one generator per row.
    generators = [torch.Generator("cpu")] * x0.shape[0]
    return denoise(guided_denoiser(pipe, guidance, conditioning), x0, sampler=DDIM_INVERSE,
                   plan=inverse, generators=generators, eta=0.0)


def sample_ddim(pipe: Pipeline, latents: torch.Tensor, plan: DDIMPlan, guidance: Guidance,
                conditioning: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta 0) over `plan` from `latents`: the forward map inversion undoes."""
    generators = [torch.Generator("cpu")] * latents.shape[0]
    return denoise(guided_denoiser(pipe, guidance, conditioning), latents, sampler=DDIM,
                   plan=plan, generators=generators, eta=0.0)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1]: 10 log10(1 / MSE) (inf if equal)."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


@dataclass(frozen=True, eq=False)
class Inversion:
    """An image's DDIM inversion: `latents` at the first level of `plan`, the DDIM tail that
    maps them back toward `x0` under `guidance` (the caption's text states)."""

    latents: torch.Tensor        # (1, C, h, w) float32, at plan's first level
    x0: torch.Tensor             # (1, C, h, w) float32, the image's scaled VAE posterior mean
    plan: DDIMPlan               # the strength's tail of the DDIM plan (all of it at strength 1)
    guidance: Guidance           # the conditioning the inversion ran under
    conditioning: torch.Tensor | None = None   # an inpainting UNet's extra channels

    @torch.inference_mode()
    def reconstruct(self, pipe: Pipeline) -> torch.Tensor:
        """DDIM (eta 0) from the inverted latents down the tail: (1, C, h, w) latents."""
        return sample_ddim(pipe, self.latents, self.plan, self.guidance, self.conditioning)

    @torch.inference_mode()
    def reconstruction_psnr(self, pipe: Pipeline) -> float:
        """PSNR (dB) of the decoded reconstruction against the image's VAE round trip D(x0): the
        inversion's own error, not the VAE's."""
        return psnr(pipe.decode(self.reconstruct(pipe)), pipe.decode(self.x0))


def image_x0(pipe: Pipeline, image: Image.Image, height: int, width: int,
             resize_mode: ResizeMode = "just-resize") -> torch.Tensor:
    """The image fitted to (height, width), encoded to its posterior mean (no randomness, so the
    inversion is a function of the image): (1, C, h, w)."""
    from .images import fit_image, to_tensor

    return pipe.encode(to_tensor(fit_image(image, width, height, resize_mode)))


def inversion_conditioning(pipe: Pipeline, n: int, height: int, width: int):
    """An inpainting UNet's extra channels (repaint everything over grey), else None."""
    from .txt2img import blank_conditioning, inpainting_channels

    return blank_conditioning(pipe, n, height, width) if inpainting_channels(pipe) else None


def invert(pipe: Pipeline, image, prompt: str = "", *, negative_prompt: str = "",
           steps: int = 50, guidance_scale: float = 1.0, strength: float = 1.0,
           clip_skip: int = 1, resize_mode: ResizeMode = "just-resize",
           height: int | None = None, width: int | None = None) -> Inversion:
    """DDIM-invert `image` (a PIL image or a path) under its caption `prompt`, to the level where
    a `steps`-step DDIM plan's `strength` tail starts (strength 1: the pure-noise end).

    The size is (height, width), else the image's rounded down to the VAE factor. Every input
    error is a UserInputError raised before any network runs.
    """
    from .images import load_image
    from .pnginfo import check_storable

    image = load_image(image)
    c = pipe.components
    f = c.vae_factor
    if (height is None and image.height < f) or (width is None and image.width < f):
        raise UserInputError(f"the image is {image.width}x{image.height}, smaller than the VAE "
                             f"factor {f}")
    height = image.height - image.height % f if height is None else height
    width = image.width - image.width % f if width is None else width
    for name, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
        if not isinstance(text, str):
            raise UserInputError(f"{name} must be a string, got {type(text).__name__}")
        check_storable([text], name)
    check_request(steps=steps, guidance_scale=guidance_scale, sampler="ddim", eta=0.0,
                  height=height, width=width, vae_factor=f, schedule=c.schedule,
                  clip_skip=clip_skip, text_layers=c.text_encoder.config.num_hidden_layers)
    check_strength(strength)
    _check_choice("resize_mode", resize_mode, ResizeMode)
    pipe.check_generation_size(height=height, width=width, num_images=1,
                               guided=guidance_scale != 1.0, allow_large=False)
    with torch.inference_mode():
        x0 = image_x0(pipe, image, height, width, resize_mode)
        guidance = pipe.guidance([prompt], [negative_prompt], guidance_scale, clip_skip)
        conditioning = inversion_conditioning(pipe, 1, height, width)
        plan = DDIM.make_plan(train_schedule(c.schedule), steps)
        start = strength_start(steps, strength)
        latents = invert_latents(pipe, x0, plan, start, guidance, conditioning)
    return Inversion(latents=latents, x0=x0, plan=DDIM.tail(plan, start), guidance=guidance,
                     conditioning=conditioning)


def invert_rows(pipe: Pipeline, x0: torch.Tensor, plan: DDIMPlan, upto: int,
                guidance: Guidance, keys: Sequence, conditioning: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Invert one image x0 (1, C, h, w) under each row of a per-image `guidance` (B rows),
    running the inverse once per distinct key (the row's caption and negative prompt: images
    with the same conditioning share one inversion). (B, C, h, w)."""
    first = list(dict.fromkeys(keys))
    rows = [list(keys).index(k) for k in first]          # the first image with each key
    pick = torch.tensor(rows, device=guidance.cond.device)
    unique = Guidance(guidance.scale, guidance.cond.index_select(0, pick),
                      None if guidance.uncond is None else guidance.uncond.index_select(0, pick))
    extra = None if conditioning is None else conditioning[:len(rows)]
    inverted = invert_latents(pipe, x0.repeat(len(rows), 1, 1, 1), plan, upto, unique, extra)
    index = torch.tensor([first.index(k) for k in keys], device=inverted.device)
    return inverted.index_select(0, index)
