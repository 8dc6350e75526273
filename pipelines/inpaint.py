"""Inpainting and outpainting: repaint where the mask is white, keep the rest.

Two ways, chosen by the UNet (txt2img.inpainting_channels):

(a) Any 4-channel UNet ("blended" inpainting; RePaint-style re-imposition without resampling,
    Lugmayr et al. 2022, Sec. 4, and what diffusers' StableDiffusionInpaintPipeline does for a
    4-channel UNet). The known region is forced back after every step: with x0 = E(image), z the
    image's starting noise and m the latent-resolution mask (1 = repaint),

        x <- m * x + (1 - m) * q(x0, z, level of step i + 1)        after step i,

    where q noises x0 with the *same* z to the input level of the next step (DDPM eq. 4 in the
    stepper's space) and is x0 itself after the last step, so the kept latents end exactly at x0.

(b) A 9-channel inpainting UNet (SD-inpainting, Rombach et al. 2022, Sec. 4.5 / App. D) reads
    [x, m, E(image * (1 - m))] at every call (Start.conditioning): it sees the known region and
    paints the hole consistently with it; nothing is re-imposed (diffusers does not either).

Randomness follows diffusers' draw order per image generator, so a seed gives diffusers' image:
image latents (a draw from the VAE posterior: 4-channel UNets always, 9-channel ones when
strength < 1), then the starting noise z, then the masked-image latents. Strength 1 starts from
pure noise z * init_noise_sigma (diffusers' is_strength_max), whatever the UNet; a smaller
strength starts from x0 noised to the strength's tail, as image to image does.

The mask is blurred by mask_blur (A1111's "Mask blur"), fitted to the generation size like the
image, binarised at 0.5 and shrunk to latent resolution by nearest sampling (images.latent_mask,
diffusers' mask processor). Binarising at 0.5 puts the latent edge where the unblurred edge was,
so the blur matters where pixels are blended: the "only masked" paste back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ldm_engine.errors import UserInputError

from .base import GenerationResult, Pipeline
from .modes import Batch, Mode, Start, native_size
from .img2img import ImageToImage, require_image, size_of_image
from .images import (Region, binarize, blur_mask, crop_region, expand_to_aspect, extend_canvas,
                     fit_image, latent_mask, load_mask, mask_to_tensor, paste_back, to_tensor)
from .observe import Observer
from .params import InpaintParams, OutpaintParams


@dataclass(frozen=True, eq=False)
class InpaintInput:
    """One image's inpainting input at the generation size, and what pasting back needs."""

    image: Image.Image                 # RGB, (width, height) of the generation
    mask: Image.Image                  # "L", blurred, same size; white = repaint
    # "Only masked": the crop of the source image that was generated, the source image itself
    # and its blurred full-size mask (paste_back); None when the whole picture is generated.
    region: Region | None = None
    source: Image.Image | None = None
    source_mask: Image.Image | None = None


def prepare_input(image: Image.Image, mask: Image.Image, request: InpaintParams, height: int,
                   width: int) -> InpaintInput:
    """Blur the mask, then fit image and mask to (height, width).

    Whole picture: both are fitted by the request's resize_mode. Only masked (A1111's
    "Inpaint area: Only masked", processing.py): the crop is the blurred mask's bounding box
    grown by `padding` (images.crop_region), widened to the generation's aspect ratio inside the
    image (expand_to_aspect); image and mask are cropped to it and resized with "fill", the
    resize mode A1111 uses for the crop (2, "Resize and fill").
    """
    blurred = blur_mask(mask, request.mask_blur)
    if not request.only_masked:
        return InpaintInput(image=fit_image(image, width, height, request.resize_mode),
                            mask=fit_image(blurred, width, height, request.resize_mode))
    box = expand_to_aspect(crop_region(blurred, request.padding), width, height,
                           image.width, image.height)
    return InpaintInput(image=fit_image(image.crop(box), width, height, "fill"),
                        mask=fit_image(blurred.crop(box), width, height, "fill"),
                        region=box, source=image, source_mask=blurred)


def _pixels_of(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as (3, H, W) float32 in [0, 1], the decoded pixels' range."""
    return torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0).permute(2, 0, 1)


def _distinct(requests):
    """One request per distinct (image, mask, seed-dependent canvas) input, in order."""
    seen, out = set(), []
    for r in requests:
        key = (r.init_image_hash, r.mask_hash, getattr(r, "fill", None) == "noise" and r.seed)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


class InpaintMode(Mode):
    name = "inpaint"
    request = InpaintParams

    def sources(self, request: InpaintParams) -> tuple[Image.Image, Image.Image]:
        """The full-size image and mask this request inpaints."""
        return request.init_image, request.mask

    def require(self, request: InpaintParams) -> None:
        require_image(request, "inpainting")
        if request.mask is None:
            hint = (f" (the PNG records only its hash, {request.mask_hash}: pass the mask)"
                    if request.mask_hash else "")
            raise UserInputError(f"inpainting needs a mask (white = repaint){hint}")

    def size(self, pipe: Pipeline, request: InpaintParams) -> tuple[int, int]:
        return size_of_image(pipe, request)

    def inputs(self, batch: Batch) -> list[InpaintInput]:
        return [prepare_input(*self.sources(r), r, batch.height, batch.width)
                for r in batch.requests]

    def shared(self, request):
        """Each image of a batch may have its own image and mask (A1111's batch tab)."""
        return super().shared(request).replace(init_image=None, init_image_hash="", mask=None,
                                               mask_hash="")

    def check(self, pipe: Pipeline, batch: Batch) -> None:
        from .txt2img import inpainting_channels

        for r in batch.requests:
            self.require(r)
        inpainting_channels(pipe)
        f = pipe.components.vae_factor
        for r in _distinct(batch.requests):
            # PIL work only (blur, crop, resize): cheap next to one UNet call.
            prepared = prepare_input(*self.sources(r), r, batch.height, batch.width)
            m = binarize(mask_to_tensor(prepared.mask))
            where = (f"after a mask blur of {r.mask_blur} px and fitting to "
                     f"{batch.width}x{batch.height}")
            if not m.any():
                raise UserInputError(f"the mask is empty {where}: no pixel is at least half "
                                     "white (white marks what to repaint)")
            if not latent_mask(m, f).any():
                raise UserInputError(f"the mask's white area is too small {where}: it covers "
                                     f"no latent ({f}x{f} pixel block, sampled at its top-left "
                                     "pixel)")

    def prepare(self, pipe: Pipeline, batch: Batch) -> Start:
        from .txt2img import inpainting_channels

        first = batch.first
        f = pipe.components.vae_factor
        inputs = self.inputs(batch)
        pixels = torch.cat([to_tensor(r.image) for r in inputs])           # (B, 3, H, W)
        mask = binarize(torch.cat([mask_to_tensor(r.mask) for r in inputs]))  # (B, 1, H, W)
        m = latent_mask(mask, f).to(pipe.device)                               # (B, 1, h, w)
        generators = batch.generators if first.init_latents == "sample" else None
        nine = inpainting_channels(pipe) > 0
        plan = batch.sampler.strength_plan(batch.schedule, first.steps, first.strength)
        pure = first.strength >= 1

        # Draws in diffusers' order (see the module docstring).
        x0 = pipe.encode(pixels, generators) if not (nine and pure) else None
        z = batch.noise((pipe.components.latent_channels, batch.height // f, batch.width // f),
                        pipe.device)
        x = z * plan.init_noise_sigma if pure else batch.sampler.noised(plan, x0, z)
        if nine:
            # The UNet's view of the known region: masked_image = image * (mask < 0.5).
            masked = pipe.encode(pixels * (mask < 0.5), generators)
            conditioning = torch.cat([m, masked], dim=1)                 # (B, 1 + C, h, w)
            hook = None
        else:
            if generators is not None:
                # diffusers encodes the masked image for 4-channel UNets too and throws it away;
                # its posterior draw still advances the generators, which the loop's per-step
                # noise (DDIM eta > 0, ancestral samplers) comes after.
                for g in generators:
                    torch.randn((1, *z.shape[1:]), generator=g, dtype=torch.float32)
            conditioning = None
            sampler = batch.sampler

            def hook(i: int, x: torch.Tensor) -> torch.Tensor:
                # The known region noised with the same z to the input level of step i + 1
                # (the clean x0 after the last step), as diffusers' add_noise(..., t[i + 1]).
                known = sampler.noised_to(plan, i + 1, x0, z)
                return m * x + (1 - m) * known

        if first.only_masked:
            def finish(decoded: torch.Tensor) -> torch.Tensor:
                # The result has the source image's size, not the generation size: each crop is
                # pasted back where it came from, blended by the blurred full-size mask (pixels
                # the mask keeps are the source's, bit for bit).
                crops = pipe.to_pil(decoded)
                out = [_pixels_of(paste_back(r.source, crop, r.region, r.source_mask))
                       for r, crop in zip(inputs, crops)]
                return torch.stack(out).to(decoded.device)
        elif first.overlay:
            def finish(decoded: torch.Tensor) -> torch.Tensor:
                # A1111's overlay: the input's own pixels wherever the blurred mask keeps them,
                # blended across its soft edge. Re-imposing the known latents alone does not
                # keep the known pixels: the decoder's receptive field (and its mid-block
                # attention) lets the repainted latents move every decoded pixel.
                alpha = torch.cat([mask_to_tensor(r.mask) for r in inputs]).to(decoded.device)
                known = (pixels.to(decoded.device) + 1) / 2                 # [-1, 1] -> [0, 1]
                return alpha * decoded + (1 - alpha) * known
        else:
            finish = None

        return Start(latents=x, plan=plan, hook=hook, conditioning=conditioning, finish=finish)


class OutpaintMode(InpaintMode):
    """Outpainting = inpainting a larger canvas: the image extended by left/right/top/bottom
    pixels (images.extend_canvas; the "noise" fill is seeded with each image's seed) with a
    mask over the new border plus `overlap` pixels of the image."""

    name = "outpaint"
    request = OutpaintParams

    def sources(self, request: OutpaintParams) -> tuple[Image.Image, Image.Image]:
        return extend_canvas(request.init_image, left=request.left, right=request.right,
                             top=request.top, bottom=request.bottom, fill=request.fill,
                             color=request.color, seed=request.seed, overlap=request.overlap)

    def require(self, request: OutpaintParams) -> None:
        require_image(request, "outpainting")

    def size(self, pipe: Pipeline, request: OutpaintParams) -> tuple[int, int]:
        """The request's size, else the canvas's, which must then be a multiple of the VAE
        factor: rounding it down would cut off part of what the user asked to add."""
        if request.init_image is None:
            return native_size(pipe, request)
        f = pipe.components.vae_factor
        w, h = request.init_image.size
        sides = {"width": (w, "left", "right", request.width),
                 "height": (h, "top", "bottom", request.height)}
        out = {}
        for name, (n, lo, hi, given) in sides.items():
            total = n + getattr(request, lo) + getattr(request, hi)
            if given is None and total % f:
                more = f - total % f
                raise UserInputError(
                    f"the outpainted canvas's {name} is {total} ({n} + {lo} "
                    f"{getattr(request, lo)} + {hi} {getattr(request, hi)}), not a multiple of "
                    f"the VAE factor {f}: add {more} to {lo} or {hi} (e.g. {hi}="
                    f"{getattr(request, hi) + more}), or give a {name}")
            out[name] = total if given is None else given
        return out["height"], out["width"]


class Inpaint(ImageToImage):
    """``Inpaint.from_folder(path)(prompt, image, mask)`` -> GenerationResult.

    Works with any UNet: 9-channel inpainting UNets are conditioned on the mask and the masked
    image, 4-channel ones have the known region re-imposed after every step (module docstring).
    With only_masked=True the result's pixels and images have the *source image's* size (the
    generated crop is pasted back into it); its latents are those of the crop.
    """

    MODE = InpaintMode()
    REQUEST = InpaintParams

    def __call__(self, prompt: str | Sequence[str], image=None, mask=None, *,
                 negative_prompt: str | Sequence[str] | None = None,
                 num_images_per_prompt: int = 1, seed: int | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 progress: bool = True, allow_large: bool = False,
                 observer: Observer | Sequence[Observer] | None = None,
                 **fields) -> GenerationResult:
        """`image` and `mask` are PIL images or paths (images.load_image / load_mask); the
        other fields are InpaintParams' (None: its default; num_inference_steps: steps)."""
        if mask is not None:
            fields["mask"] = load_mask(mask)
        return super().__call__(prompt, image, negative_prompt=negative_prompt,
                                num_images_per_prompt=num_images_per_prompt, seed=seed,
                                generator=generator, progress=progress, allow_large=allow_large,
                                observer=observer, **fields)


class Outpaint(ImageToImage):
    """``Outpaint.from_folder(path)(prompt, image, right=64)`` -> GenerationResult whose images
    have the canvas's size (image + extensions) unless height/width are given."""

    MODE = OutpaintMode()
    REQUEST = OutpaintParams

    def __call__(self, prompt: str | Sequence[str], image=None, *, left: int | None = None,
                 right: int | None = None, top: int | None = None, bottom: int | None = None,
                 negative_prompt: str | Sequence[str] | None = None,
                 num_images_per_prompt: int = 1, seed: int | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 progress: bool = True, allow_large: bool = False,
                 observer: Observer | Sequence[Observer] | None = None,
                 **fields) -> GenerationResult:
        """Pixels to add on each side; the other fields are OutpaintParams' (fill, color,
        overlap, mask_blur, strength, ...; None: the default)."""
        return super().__call__(prompt, image, negative_prompt=negative_prompt,
                                num_images_per_prompt=num_images_per_prompt, seed=seed,
                                generator=generator, progress=progress, allow_large=allow_large,
                                observer=observer, left=left, right=right, top=top,
                                bottom=bottom, **fields)
