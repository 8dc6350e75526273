"""Image to image (SDEdit: Meng et al. 2022, "Guided image synthesis and editing with
stochastic differential equations").

The init image is encoded with the VAE, x0 = E(image), noised to the level of the plan's step
t_start, x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) z (for sigma samplers x0 + sigma z), and
only the plan's tail is run: with N steps and strength s, diffusers' rule

    t_start = N - min(int(N s), N),    steps run = N - t_start = int(N s)

so s = 1 ignores the image (pure noise at the first level: txt2img), and s -> 0 runs no step and
returns the VAE round trip D(E(image)). AUTOMATIC1111 runs int(N s) + 1 steps instead; this
engine follows diffusers, which its parity tests check pixel for pixel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ldm_engine.errors import UserInputError
from schedulers import Plan

from .base import GenerationResult, Pipeline
from .modes import Batch, Mode, Start, native_size, requests_for
from .observe import Observer
from .params import ImageToImageParams


def noised_start(pipe: Pipeline, batch: Batch, x0: torch.Tensor, strength: float,
                 steps: int) -> tuple[torch.Tensor, Plan, torch.Tensor]:
    """x0 noised to the level where the strength's tail of a `steps` plan starts: (x, tail, z).

    z is each image's standard-normal draw (its own generator); inpainting re-noises the known
    region with the same z at every later level, as diffusers does.
    """
    # strength_plan cuts the plan at strength_start(steps, strength), counted in model calls for
    # diffusers schedulers that make two per step (Heun, KDPM2).
    tail = batch.sampler.strength_plan(batch.schedule, steps, strength)
    z = batch.noise(x0.shape[1:], x0.device)
    return batch.sampler.noised(tail, x0, z), tail, z


def init_pixels(request: ImageToImageParams, n: int, height: int, width: int) -> torch.Tensor:
    """The init image fitted to the generation size (request.resize_mode), in [-1, 1],
    repeated for the n images of the batch: (n, 3, height, width)."""
    from .images import fit_image, to_tensor

    image = fit_image(request.init_image, width, height, request.resize_mode)
    return to_tensor(image).repeat(n, 1, 1, 1)


def require_image(request: ImageToImageParams, what: str = "image to image") -> None:
    if request.init_image is None:
        hint = (f" (the PNG records only its hash, {request.init_image_hash}: pass the image)"
                if request.init_image_hash else "")
        raise UserInputError(f"{what} needs an init image{hint}")


def size_of_image(pipe: Pipeline, request: ImageToImageParams) -> tuple[int, int]:
    """The request's size, else the init image's rounded down to the VAE factor (diffusers)."""
    f = pipe.components.vae_factor
    if request.init_image is None:
        return native_size(pipe, request)
    w, h = request.init_image.size
    if (request.height is None and h < f) or (request.width is None and w < f):
        raise UserInputError(f"the init image is {w}x{h}, smaller than the VAE factor {f}")
    return (h - h % f if request.height is None else request.height,
            w - w % f if request.width is None else request.width)


class ImageToImageMode(Mode):
    name = "img2img"
    request = ImageToImageParams

    def size(self, pipe, request):
        return size_of_image(pipe, request)

    def shared(self, request):
        """A batch may give each image its own init image (fitted to the first's size when no
        size is given), as diffusers takes a list of images."""
        return super().shared(request).replace(init_image=None, init_image_hash="")

    def check(self, pipe: Pipeline, batch: Batch) -> None:
        from .txt2img import inpainting_channels

        for r in batch.requests:
            require_image(r)
        inpainting_channels(pipe)

    def prepare(self, pipe: Pipeline, batch: Batch) -> Start:
        from .txt2img import blank_conditioning, inpainting_channels

        first = batch.first
        pixels = torch.cat([init_pixels(r, 1, batch.height, batch.width)
                            for r in batch.requests])                     # (B, 3, H, W)
        x0 = pipe.encode(pixels, batch.generators if first.init_latents == "sample" else None)
        x, plan, _ = noised_start(pipe, batch, x0, first.strength, first.steps)
        # An inpainting UNet repaints everything here: mask 1 over a grey image (A1111).
        conditioning = (blank_conditioning(pipe, len(batch), batch.height, batch.width)
                        if inpainting_channels(pipe) else None)
        return Start(latents=x, plan=plan, conditioning=conditioning)


class ImageToImage(Pipeline):
    """``ImageToImage.from_folder(path)(prompt, image, strength=0.6)`` -> GenerationResult."""

    MODE = ImageToImageMode()
    REQUEST = ImageToImageParams

    def __call__(self, prompt: str | Sequence[str], image=None, *,
                 negative_prompt: str | Sequence[str] | None = None,
                 num_images_per_prompt: int = 1, seed: int | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 progress: bool = True, allow_large: bool = False,
                 observer: Observer | Sequence[Observer] | None = None,
                 rerank_batch: int | None = None, **fields) -> GenerationResult:
        """Build this mode's request from `fields` (its field names, or diffusers'
        num_inference_steps; None: the request's default) and run it. `image` is a PIL image or
        a path (pipelines.images.load_image converts non-RGB images, with a warning).
        rerank_batch: see Pipeline.run."""
        return self.run(self.requests(prompt, image, negative_prompt, seed,
                                      num_images_per_prompt, **fields),
                        num_images=num_images_per_prompt, generator=generator,
                        observer=observer, progress=progress, allow_large=allow_large,
                        rerank_batch=rerank_batch)

    def requests(self, prompt, image, negative_prompt, seed, k, **fields):
        from .images import load_image

        if "num_inference_steps" in fields:
            fields["steps"] = fields.pop("num_inference_steps")
        if fields.get("eta") == "auto":
            fields["eta"] = None
        if image is not None:
            fields["init_image"] = load_image(image)
        return requests_for(self.REQUEST, prompt, negative_prompt, seed, k, **fields)
