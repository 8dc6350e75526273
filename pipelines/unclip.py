"""unCLIP's image abilities (Ramesh et al. 2022, Sec. 3) without a CLIP image prior: variations,
interpolations and text-diff edits, each a "prepare" over the one loop.

unCLIP decodes a CLIP image embedding; a text-conditioned latent diffusion model has no such
embedding, so here the image's handle is its DDIM inversion (pipelines.inversion): the noise
latent that deterministic DDIM maps back to the image under its caption.

- Vary: start from the inversion and sample with eta > 0 (Song et al. 2021, eq. 16): the fresh
  noise of each seed gives a variant; eta 0 reconstructs (unCLIP Sec. 3.1's variations).
- Interpolate: frame k of K is slerp(z_start, z_end, t_k), t_k = k / (K - 1), with the text
  states slerped alike (unCLIP Sec. 3.2 slerps the image embeddings; Shoemake 1985).
- Edit: the noise stays the caption's inversion, the text states move along the difference of
  the captions' states (unCLIP Sec. 3.3's text diffs, in text-state space).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ldm_engine.errors import UserInputError
from schedulers import strength_start

from .base import GenerationResult, Pipeline
from .modes import Batch, Mode, Start
from .guidance import Guidance
from .img2img import ImageToImage, require_image, size_of_image
from .inversion import image_x0, invert_rows
from .params import EditParams, GenerationParams, InterpolationParams, VariationParams


def _conditioning(pipe: Pipeline, n: int, height: int, width: int):
    """An inpainting UNet's extra channels (repaint everything over grey), else None."""
    from .txt2img import blank_conditioning, inpainting_channels

    return blank_conditioning(pipe, n, height, width) if inpainting_channels(pipe) else None


def _one_sequence(num_images: int, what: str, per: str) -> None:
    if num_images != 1:
        raise UserInputError(f"{what} makes one image per {per}: num_images must be 1, got "
                             f"{num_images!r}")


def _split_states(pipe: Pipeline, groups: Sequence[list[str]], clip_skip: int
                  ) -> list[torch.Tensor]:
    """Text states of each group of texts, each group encoded in one call (as Pipeline.guidance
    encodes a batch's prompts and negatives); when the groups' window counts differ, all are
    encoded together so every state has the same (77 * k, D) shape for slerp and sums."""
    states = [pipe.encode_text(g, clip_skip) for g in groups]
    if len({s.shape[1] for s in states}) > 1:
        joint = pipe.encode_text([t for g in groups for t in g], clip_skip)
        states = list(joint.split([len(g) for g in groups]))
    return states


# --- variations --------------------------------------------------------------------------


class VaryMode(Mode):
    name = "vary"
    request = VariationParams

    def size(self, pipe, request):
        return size_of_image(pipe, request)

    def check(self, pipe: Pipeline, batch: Batch) -> None:
        from .txt2img import inpainting_channels

        require_image(batch.first, "a variation")
        inpainting_channels(pipe)

    def prepare(self, pipe: Pipeline, batch: Batch) -> Start:
        first = batch.first
        images = batch.requests
        plan = batch.plan()
        start = strength_start(first.steps, first.strength)
        guidance = pipe.guidance([r.prompt for r in images], [r.negative_prompt for r in images],
                                 first.guidance_scale, first.clip_skip)
        conditioning = _conditioning(pipe, len(batch), batch.height, batch.width)
        x0 = image_x0(pipe, first.init_image, batch.height, batch.width, first.resize_mode)
        # Inverted under the very states the sampling uses, once per distinct caption.
        latents = invert_rows(pipe, x0, plan, start, guidance,
                              [(r.prompt, r.negative_prompt) for r in images], conditioning)
        return Start(latents=latents, plan=batch.sampler.tail(plan, start), guidance=guidance,
                     conditioning=conditioning)


# --- interpolation -----------------------------------------------------------------------


class InterpolateMode(Mode):
    name = "interpolate"
    request = InterpolationParams

    def expand(self, request: InterpolationParams, num_images: int) -> list[GenerationParams]:
        """One request per frame, frame = k, all with the request's seed; end_seed resolved
        (None: seed + 1). A request that names its frame (read back from a PNG) is that one."""
        _one_sequence(num_images, "an interpolation", "frame")
        request.check_mode()            # frames and seeds must be sound before they make images
        if request.end_seed is None:
            request = request.replace(end_seed=request.seed + 1)
        if request.frame is not None:
            return [request]
        return [request.replace(frame=k) for k in range(request.frames)]

    def shared(self, request):
        # Prepared per image: each frame's own prompts, seeds and position.
        return request.replace(prompt="", negative_prompt="", seed=0, end_prompt="",
                               end_seed=None, frame=None)

    def size(self, pipe, request):
        return size_of_image(pipe, request)

    def check(self, pipe: Pipeline, batch: Batch) -> None:
        from .txt2img import inpainting_channels

        from .pnginfo import check_storable

        inpainting_channels(pipe)
        check_storable([r.end_prompt for r in batch.requests], "end prompt")
        for r in batch.requests:
            if r.end_image is None and r.end_image_hash:
                raise UserInputError(f"this interpolation ends at an image (hash "
                                     f"{r.end_image_hash}): pass end_image")
            if r.init_image is None and r.init_image_hash:
                raise UserInputError(f"this interpolation starts at an image (hash "
                                     f"{r.init_image_hash}): pass init_image")

    def prepare(self, pipe: Pipeline, batch: Batch) -> Start:
        c = pipe.components
        f = c.vae_factor
        first = batch.first
        images = batch.requests
        plan = batch.plan()
        conditioning = _conditioning(pipe, len(batch), batch.height, batch.width)
        starts = [r.prompt for r in images]
        ends = [r.end_prompt or r.prompt for r in images]
        negatives = [r.negative_prompt for r in images]
        scale = first.guidance_scale
        if scale == 1.0:
            cond_a, cond_b = _split_states(pipe, [starts, ends], first.clip_skip)
            uncond_a = uncond_b = None
        else:
            # Each end encoded as text to image encodes it: prompts and negatives together.
            a, b = _split_states(pipe, [starts + negatives, ends + negatives], first.clip_skip)
            n = len(images)
            cond_a, uncond_a, cond_b, uncond_b = a[:n], a[n:], b[:n], b[n:]
        # The start noise is each frame's own draw from its generator (seed), exactly as text to
        # image draws it, so frame 0 is txt2img(prompt, seed), variance noise included.
        shape = (c.latent_channels, batch.height // f, batch.width // f)
        z_start = batch.noise(shape, pipe.device)
        if first.init_image is not None:
            x0 = image_x0(pipe, first.init_image, batch.height, batch.width, first.resize_mode)
            z_start = invert_rows(pipe, x0, plan, 0, Guidance(scale, cond_a, uncond_a),
                                  [(p, q) for p, q in zip(starts, negatives)], conditioning)
        if first.end_image is not None:
            x0 = image_x0(pipe, first.end_image, batch.height, batch.width, first.resize_mode)
            z_end = invert_rows(pipe, x0, plan, 0, Guidance(scale, cond_b, uncond_b),
                                [(p, q) for p, q in zip(ends, negatives)], conditioning)
        else:
            z_end = torch.cat([torch.randn((1, *shape), dtype=torch.float32,
                                           generator=torch.Generator("cpu").manual_seed(
                                               int(r.end_seed)))
                               for r in images]).to(z_start.device)
        if first.init_image is None:
            z_start = z_start * plan.init_noise_sigma
        if first.end_image is None:
            z_end = z_end * plan.init_noise_sigma
        return Start(latents=_slerp_rows(z_start, z_end, images), plan=plan,
                     guidance=Guidance(scale, _slerp_rows(cond_a, cond_b, images),
                                       None if uncond_a is None else
                                       _slerp_rows(uncond_a, uncond_b, images)),
                     conditioning=conditioning)


def _slerp_rows(a: torch.Tensor, b: torch.Tensor, images: Sequence[InterpolationParams]
                ) -> torch.Tensor:
    """Row k: slerp(a_k, b_k, t_k) over the whole flattened row (a latent (C, h, w) or a text
    state matrix (77 * w, D)), t_k = frame_k / (frames - 1)."""
    from .images import slerp

    return torch.cat([slerp(a[k:k + 1], b[k:k + 1], r.frame / (r.frames - 1))
                      for k, r in enumerate(images)])


def save_sequence(result: GenerationResult, path: str | os.PathLike, *,
                  animation: str = ".gif", duration_ms: int = 100) -> tuple[Path, Path]:
    """Write a sequence (interpolation frames, edit amounts) as one grid PNG at `path` (a row,
    in order) and an animation beside it with the `animation` suffix (".gif" or ".webp").
    Each frame's parameters are in its own PNG (GenerationResult.save). (grid, animation)."""
    from ldm_engine.fsutil import atomic_path

    from .images import image_grid, save_animation

    grid_path = Path(path)
    if grid_path.suffix.lower() != ".png":
        raise UserInputError(f"the sequence's grid is a PNG: the name must end in .png, got "
                             f"{grid_path.name}")
    anim_path = grid_path.with_suffix(animation)
    save_animation(result.images, anim_path, duration_ms=duration_ms)
    grid = image_grid(result.images, cols=len(result.images))
    with atomic_path(grid_path) as tmp:
        grid.save(tmp, format="PNG")
    return grid_path, anim_path


# --- text-diff edits ---------------------------------------------------------------------


def edit_states(source: torch.Tensor, target: torch.Tensor, amount: float) -> torch.Tensor:
    """c(s) = c_src + s ||c_tgt - c_src|| d,  d = (c_tgt - c_src) / ||c_tgt - c_src||.

    unCLIP's text diff (Ramesh et al. 2022, Sec. 3.3) moves along the normalised difference of
    the captions' embeddings. Here the difference is taken per token row of the (77 * w, D)
    states: each row moves along its own unit direction, so a row where the captions agree
    (the BOS state, identical for every caption under CLIP's causal mask, and shared padding)
    has d = 0 and stays exactly put. The step is measured in units of that row's own distance,
    so the norms cancel and c(s) = c_src + s (c_tgt - c_src): s = 0 is the caption (the
    reconstruction), s = 1 is the target caption's states exactly, s > 1 extrapolates. A whole-
    matrix normalisation gives the same c(s); it is the unit step that makes `amount` read the
    same for any pair of captions, whatever the length of their difference.
    """
    delta = target - source                                       # (B, 77 * w, D)
    length = delta.norm(dim=-1, keepdim=True)                     # (B, 77 * w, 1)
    d = torch.where(length > 0, delta / length.clamp_min(torch.finfo(delta.dtype).tiny),
                    torch.zeros_like(delta))
    return source + amount * length * d


class EditMode(Mode):
    name = "edit"
    request = EditParams

    def expand(self, request: EditParams, num_images: int) -> list[GenerationParams]:
        """One request per amount (amount set), all with the request's seed; a request that
        names its amount (read back from a PNG) is that one."""
        _one_sequence(num_images, "a text-diff edit", "amount")
        request.check_mode()            # the amounts must be sound before they make the images
        if request.amount is not None:
            return [request]
        return [request.replace(amount=float(s)) for s in request.amounts]

    def shared(self, request):
        return request.replace(prompt="", negative_prompt="", seed=0, target_prompt="",
                               amount=None)

    def size(self, pipe, request):
        return size_of_image(pipe, request)

    def check(self, pipe: Pipeline, batch: Batch) -> None:
        from .txt2img import inpainting_channels

        from .pnginfo import check_storable

        require_image(batch.first, "a text-diff edit")
        inpainting_channels(pipe)
        check_storable([r.target_prompt for r in batch.requests], "target prompt")

    def prepare(self, pipe: Pipeline, batch: Batch) -> Start:
        first = batch.first
        images = batch.requests
        n = len(images)
        plan = batch.plan()
        start = strength_start(first.steps, first.strength)
        # Caption, target (and negatives) in one call: one window count for the difference.
        texts = [r.prompt for r in images] + [r.target_prompt for r in images]
        if first.guidance_scale != 1.0:
            texts += [r.negative_prompt for r in images]
        states = pipe.encode_text(texts, first.clip_skip)
        source, target = states[:n], states[n:2 * n]
        uncond = states[2 * n:] if first.guidance_scale != 1.0 else None
        conditioning = _conditioning(pipe, n, batch.height, batch.width)
        x0 = image_x0(pipe, first.init_image, batch.height, batch.width, first.resize_mode)
        # The noise is the caption's inversion, the same for every amount.
        latents = invert_rows(pipe, x0, plan, start, Guidance(first.guidance_scale, source,
                                                               uncond),
                              [(r.prompt, r.negative_prompt) for r in images], conditioning)
        amounts = torch.tensor([r.amount for r in images], dtype=source.dtype,
                               device=source.device).view(n, 1, 1)
        cond = edit_states(source, target, amounts)
        return Start(latents=latents, plan=batch.sampler.tail(plan, start),
                     guidance=Guidance(first.guidance_scale, cond, uncond),
                     conditioning=conditioning)


# --- pipeline classes --------------------------------------------------------------------


class Vary(ImageToImage):
    """``Vary.from_folder(path)("a caption", image, eta=0.6, num_images_per_prompt=4)``."""

    MODE = VaryMode()
    REQUEST = VariationParams


class Edit(ImageToImage):
    """``Edit.from_folder(path)("a cat", image, target_prompt="a dog", amounts=(0.5, 1.0))``."""

    MODE = EditMode()
    REQUEST = EditParams


class Interpolate(ImageToImage):
    """``Interpolate.from_folder(path)("a cat", end_prompt="a dog", frames=8, seed=1)``; `image`
    (optional) starts at an image's inversion, `end_image` ends at one."""

    MODE = InterpolateMode()
    REQUEST = InterpolationParams

    def requests(self, prompt, image, negative_prompt, seed, k, **fields):
        from .images import load_image

        if fields.get("end_image") is not None:
            fields["end_image"] = load_image(fields["end_image"], "end image")
        return super().requests(prompt, image, negative_prompt, seed, k, **fields)
