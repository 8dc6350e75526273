"""What one generated image was made with, validated before any compute.

Its PNG form (the AUTOMATIC1111 ``parameters`` text) is in ``pipelines.pnginfo``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
from dataclasses import dataclass, field
from typing import ClassVar, Literal, get_args

from PIL import Image

from ldm_engine.config_check import ModelShape
from ldm_engine.errors import UserInputError
from ldm_engine.limits import check_size
from schedulers import SAMPLERS, ScheduleConfig, get_sampler, train_schedule

from .prompts import check_clip_skip

# The networks' precision as GenerationParams records it (ldm_engine.precision.DTYPES' names).
Precision = Literal["fp32", "bf16", "fp16"]
# How an init image is fitted to the generation size: A1111's img2img "Resize mode"
# (pipelines.images.fit_image): stretch, scale-to-cover and centre-crop, scale-to-fit and fill.
ResizeMode = Literal["just-resize", "crop", "fill"]
# Which latent an init image encodes to: a draw from the VAE posterior N(mean, std^2), from the
# image's own generator (diffusers' default, sample_mode="sample"), or its mean ("argmax").
InitLatents = Literal["sample", "mode"]
# Hires-fix upscalers: the latent ones are A1111's "Latent", "Latent (bicubic)", "Latent
# (nearest)" (torch interpolate of the latents); "lanczos" decodes, resizes the pixels and encodes.
Upscaler = Literal["latent", "latent-bicubic", "latent-nearest", "lanczos"]
# Outpainting's fill of the new border before it is inpainted (pipelines.images.extend_canvas).
OutpaintFill = Literal["edge", "noise", "color"]


@dataclass(frozen=True, kw_only=True)
class HiresFix:
    """A1111's "Hires. fix": generate at the request's size, upscale by `scale`, then re-denoise
    the large image image-to-image with `strength` over `steps` steps (0: the base steps)."""

    # A1111's default upscale is 2: a 512 px model then makes 1024 px images.
    scale: float = 2.0
    # A1111's default upscaler is "Latent" (bilinear in latent space).
    upscaler: Upscaler = "latent"
    # A1111's "Hires steps": 0 means as many as the first pass.
    steps: int = 0
    # A1111's "Denoising strength" of the second pass, 0.7 by default; latent upscales need
    # >= ~0.5, or the blur of upscaled latents stays visible.
    strength: float = 0.7

    def size(self, height: int, width: int, factor: int) -> tuple[int, int]:
        """The second pass's (height, width): scaled and rounded down to the VAE factor."""
        return (int(height * self.scale) // factor * factor,
                int(width * self.scale) // factor * factor)


@dataclass(frozen=True, kw_only=True)
class GenerationParams:
    """Text to image: everything that decides one image (its own seed), and the mode's defaults.

    The defaults here are the only ones: the Python call, the CLI, the HTTP API and the PNG reader
    build requests from these. None means "the model's": the native size, the sampler's eta.
    """

    prompt: str
    negative_prompt: str = ""
    # A sampler such as DPM++ 2M Karras converges in 20-30 steps; DDIM wants more, 30 is between.
    steps: int = 30
    guidance_scale: float = 7.5
    sampler: str = "ddim"
    # None: the sampler's own (0 for DDIM and the ODE samplers, 1 for ancestral / SDE ones).
    eta: float | None = None
    # None: the model's native size (sample_size x VAE factor: 512 for SD-1.x, 64 bundled).
    height: int | None = None
    width: int | None = None
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
    # Text to image only: a second, image-to-image pass at a larger size (None: off).
    hires: HiresFix | None = None
    # Make this many candidates of every image and keep the one CLIP finds closest to its
    # prompt (DALL-E's reranking; pipelines.rerank). Candidate j is made with seed
    # candidate_seed(seed, j), candidate 0 with the image's own seed: 1 is the plain image.
    rerank: int = 1

    # The registry name of the mode this request runs (pipelines.registry).
    mode: ClassVar[str] = "txt2img"

    def validate(self, vae_factor: int = 8) -> None:
        """The checks that need no model (the pipeline adds the model's own)."""
        check_rerank(self.rerank)
        check_request(steps=self.steps, guidance_scale=self.guidance_scale, sampler=self.sampler,
                      eta=0.0 if self.eta is None else self.eta,
                      height=self.height or vae_factor, width=self.width or vae_factor,
                      vae_factor=vae_factor, clip_skip=self.clip_skip)
        self.check_mode(vae_factor)

    def check_mode(self, vae_factor: int = 8) -> None:
        """This mode's own fields (text to image: the hires fix)."""
        if self.hires is not None:
            check_hires(self.hires)

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


def image_hash(image: Image.Image | None) -> str:
    """10 hex digits of the SHA-256 of an image's mode, size and pixels: what a PNG records of
    the init image and mask (which it does not hold), so a re-play can tell it got the same."""
    if image is None:
        return ""
    h = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode())
    h.update(image.tobytes())
    return h.hexdigest()[:10]


@dataclass(frozen=True, kw_only=True)
class ImageToImageParams(GenerationParams):
    """Image to image (SDEdit, Meng et al. 2022): the init image, encoded and noised to
    `strength`, is denoised over the last int(steps * strength) steps of the plan."""

    # The image itself (RGB; pipelines.images.load_image converts, saying so). None only in a
    # request read back from a PNG, which records its hash: the caller supplies the image.
    init_image: Image.Image | None = field(default=None, repr=False, compare=False)
    # image_hash(init_image), filled in when the image is given.
    init_image_hash: str = ""
    # A1111's "Denoising strength" (its default 0.75): 1 ignores the image, -> 0 returns it.
    strength: float = 0.75
    resize_mode: ResizeMode = "just-resize"
    init_latents: InitLatents = "sample"

    mode: ClassVar[str] = "img2img"

    def __post_init__(self) -> None:
        if self.init_image is not None:
            if not isinstance(self.init_image, Image.Image):
                raise UserInputError(f"init_image must be a PIL image (pipelines.images."
                                     f"load_image reads files), got {type(self.init_image).__name__}")
            if self.init_image.mode != "RGB" or "transparency" in self.init_image.info:
                from .images import load_image      # converts, with an ImageConvertedWarning
                object.__setattr__(self, "init_image", load_image(self.init_image))
            object.__setattr__(self, "init_image_hash", image_hash(self.init_image))

    def check_mode(self, vae_factor: int = 8) -> None:
        if self.hires is not None:
            raise UserInputError("the hires fix is a text-to-image option; image to image "
                                 "already starts from an image")
        check_strength(self.strength)
        _check_choice("resize_mode", self.resize_mode, ResizeMode)
        _check_choice("init_latents", self.init_latents, InitLatents)


@dataclass(frozen=True, kw_only=True)
class InpaintParams(ImageToImageParams):
    """Inpainting: repaint where the mask is white, keep the rest. Any UNet re-imposes the known
    region at every step; a 9-channel inpainting UNet also reads the mask and masked image."""

    # White (255) = repaint, black = keep (A1111 and diffusers). Same size as the init image.
    mask: Image.Image | None = field(default=None, repr=False, compare=False)
    mask_hash: str = ""
    # Repaint everything under the mask: the init image only shapes the known region.
    strength: float = 1.0
    # A1111's "Mask blur" (Gaussian radius in pixels; its default 4) softens the seam.
    mask_blur: int = 4
    # A1111's "Inpaint area: Only masked": generate the mask's bounding box plus `padding`
    # pixels at the full generation size, then paste it back (detail for small regions).
    only_masked: bool = False
    padding: int = 32
    # Paste the input's pixels back outside the blurred mask after decoding (A1111's overlay;
    # "only masked" always pastes). Off by default: diffusers' pipeline does not, and its
    # images are what the parity tests compare.
    overlay: bool = False

    mode: ClassVar[str] = "inpaint"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask is not None:
            if not isinstance(self.mask, Image.Image):
                raise UserInputError(f"mask must be a PIL image (pipelines.images.load_mask reads "
                                     f"files), got {type(self.mask).__name__}")
            if self.mask.mode != "L":
                from .images import load_mask       # to "L", saying how when it is not plain
                object.__setattr__(self, "mask", load_mask(self.mask))
            object.__setattr__(self, "mask_hash", image_hash(self.mask))

    def check_mode(self, vae_factor: int = 8) -> None:
        super().check_mode(vae_factor)
        _check_count("mask_blur", self.mask_blur, zero=True)
        _check_count("padding", self.padding, zero=True)
        for name in ("only_masked", "overlay"):
            if not isinstance(getattr(self, name), bool):
                raise UserInputError(f"{name} must be True or False, got "
                                     f"{getattr(self, name)!r}")
        if (self.init_image is not None and self.mask is not None
                and self.init_image.size != self.mask.size):
            raise UserInputError(f"the mask is {self.mask.width}x{self.mask.height} but the image "
                                 f"is {self.init_image.width}x{self.init_image.height}; they must "
                                 "be the same size")


@dataclass(frozen=True, kw_only=True)
class OutpaintParams(InpaintParams):
    """Outpainting: extend the canvas by some pixels on chosen sides, fill the new border, and
    inpaint it (the mask is made here, not given)."""

    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0
    fill: OutpaintFill = "edge"
    color: tuple[int, int, int] = (127, 127, 127)
    # The mask reaches this many pixels into the original, so the seam itself is repainted.
    overlap: int = 8

    mode: ClassVar[str] = "outpaint"

    def check_mode(self, vae_factor: int = 8) -> None:
        if self.mask is not None:
            raise UserInputError("outpainting makes its own mask (the new border); give none")
        super().check_mode(vae_factor)
        for side in ("left", "right", "top", "bottom", "overlap"):
            _check_count(side, getattr(self, side), zero=True)
        if not (self.left or self.right or self.top or self.bottom):
            raise UserInputError("outpainting needs at least one of left/right/top/bottom > 0 "
                                 "(pixels to add)")
        _check_choice("fill", self.fill, OutpaintFill)
        if (not isinstance(self.color, tuple) or len(self.color) != 3
                or not all(isinstance(c, int) and 0 <= c <= 255 for c in self.color)):
            raise UserInputError(f"color must be three integers 0-255, got {self.color!r}")


@dataclass(frozen=True, kw_only=True)
class VariationParams(ImageToImageParams):
    """Variations of an image (unCLIP's, made with DDIM inversion rather than a CLIP image
    embedding): the image is inverted under its caption (`prompt`) to the noise latent that DDIM
    with eta = 0 maps back to it (pipelines.inversion), then sampled from there with eta > 0 and
    a fresh seed per variant. eta = 0 and strength 1 reconstruct the image; a smaller strength
    re-noises from part-way down the inverted trajectory (closer variants)."""

    sampler: str = "ddim"          # inversion is DDIM's: the only sampler a variation runs
    # The stochastic part of DDIM (Song et al. 2021, eq. 16): 0 reconstructs, 1 is DDPM-like.
    eta: float | None = 0.6
    strength: float = 1.0
    # Classifier-free guidance amplifies inversion error (Mokady et al. 2023): a low scale.
    guidance_scale: float = 1.0
    # Inversion is of the posterior mean, so it is a function of the image alone.
    init_latents: InitLatents = "mode"

    mode: ClassVar[str] = "vary"

    def check_mode(self, vae_factor: int = 8) -> None:
        super().check_mode(vae_factor)
        check_inversion(self, "a variation")


@dataclass(frozen=True, kw_only=True)
class InterpolationParams(GenerationParams):
    """A sequence of frames between two endpoints, each a (noise latent, text states) pair:
    frame k of `frames` is made from slerp(z_start, z_end, t_k) and slerp(c_start, c_end, t_k),
    t_k = k / (frames - 1) (unCLIP's interpolations). The start is (seed, prompt) or, with
    init_image, the image's DDIM-inverted latent; the end is (end_seed, end_prompt) or end_image's."""

    end_prompt: str = ""           # "" : the same prompt at both ends (interpolate the noise)
    end_seed: int | None = None    # None: seed + 1
    init_image: Image.Image | None = field(default=None, repr=False, compare=False)
    init_image_hash: str = ""
    end_image: Image.Image | None = field(default=None, repr=False, compare=False)
    end_image_hash: str = ""
    # How init_image and end_image are fitted to the generation size (as image to image).
    resize_mode: ResizeMode = "just-resize"
    frames: int = 8
    # Which frame this image is (0..frames-1): set per image by the run; None in a request.
    frame: int | None = None

    mode: ClassVar[str] = "interpolate"

    def __post_init__(self) -> None:
        for name in ("init_image", "end_image"):
            image = getattr(self, name)
            if image is not None:
                if not isinstance(image, Image.Image):
                    raise UserInputError(f"{name} must be a PIL image, got {type(image).__name__}")
                object.__setattr__(self, name + "_hash", image_hash(image))

    def check_mode(self, vae_factor: int = 8) -> None:
        if self.hires is not None:
            raise UserInputError("the hires fix is a text-to-image option, not an interpolation's")
        check_no_rerank(self, "an interpolation's frames")
        if not isinstance(self.end_prompt, str):
            raise UserInputError(f"end_prompt must be a string, got "
                                 f"{type(self.end_prompt).__name__}")
        _check_count("frames", self.frames)
        if self.frames < 2:
            raise UserInputError(f"an interpolation needs frames >= 2 (its two ends), got "
                                 f"{self.frames}")
        if self.frame is not None:
            _check_count("frame", self.frame, zero=True)
            if self.frame >= self.frames:
                raise UserInputError(f"frame {self.frame} is out of range for {self.frames} "
                                     f"frames (0 to {self.frames - 1})")
        if self.end_seed is not None:
            check_seed(self.end_seed)
        _check_choice("resize_mode", self.resize_mode, ResizeMode)
        if (self.init_image is not None or self.end_image is not None) and self.sampler != "ddim":
            raise UserInputError(f"an interpolation from images starts from their DDIM "
                                 f"inversions: the sampler must be ddim, got {self.sampler!r}")


@dataclass(frozen=True, kw_only=True)
class EditParams(ImageToImageParams):
    """A text-diff edit (unCLIP, Ramesh et al. 2022, Sec. 3.3): the image is DDIM-inverted under
    its caption (`prompt`), then re-generated from that fixed noise with the conditioning moved
    along the normalised difference of the captions' text states, toward `target_prompt`, by
    each of `amounts` (one image each)."""

    target_prompt: str = ""
    amounts: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    # Which amount this image is: set per image by the run; None in a request.
    amount: float | None = None
    sampler: str = "ddim"
    eta: float | None = 0.0
    strength: float = 1.0
    guidance_scale: float = 1.0
    init_latents: InitLatents = "mode"

    mode: ClassVar[str] = "edit"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.amounts, list):          # a list from JSON or the CLI: kept as a tuple
            object.__setattr__(self, "amounts", tuple(self.amounts))

    def check_mode(self, vae_factor: int = 8) -> None:
        super().check_mode(vae_factor)
        check_inversion(self, "a text-diff edit")
        check_no_rerank(self, "a text-diff edit's images")
        if not isinstance(self.target_prompt, str) or not self.target_prompt.strip():
            raise UserInputError("a text-diff edit needs a target_prompt (the caption to move "
                                 "toward)")
        if not isinstance(self.amounts, tuple) or not self.amounts:
            raise UserInputError(f"amounts must be a non-empty list of numbers, got "
                                 f"{self.amounts!r}")
        for a in self.amounts + (() if self.amount is None else (self.amount,)):
            if not _is_real(a) or not math.isfinite(a):
                raise UserInputError(f"every edit amount must be a finite number, got {a!r}")


def check_inversion(request: ImageToImageParams, what: str) -> None:
    """What a mode built on DDIM inversion (pipelines.inversion) needs of its request."""
    if request.sampler != "ddim":
        raise UserInputError(f"{what} runs DDIM from the image's DDIM inversion: the sampler "
                             f"must be ddim, got {request.sampler!r}")
    if request.init_latents != "mode":
        raise UserInputError(f"{what} inverts the image's posterior mean: init_latents must be "
                             f"'mode', got {request.init_latents!r}")


def check_strength(strength) -> None:
    if not _is_real(strength) or not 0 < strength <= 1:
        raise UserInputError(f"strength (denoising strength) must be a number in (0, 1], got "
                             f"{strength!r}")


def check_hires(hires: HiresFix) -> None:
    if not isinstance(hires, HiresFix):
        raise UserInputError(f"hires must be a HiresFix, got {type(hires).__name__}")
    if not _is_real(hires.scale) or not 1 <= hires.scale <= 8:
        raise UserInputError(f"hires scale must be a number in [1, 8], got {hires.scale!r}")
    _check_choice("hires upscaler", hires.upscaler, Upscaler)
    _check_count("hires steps", hires.steps, zero=True)
    check_strength(hires.strength)


def _check_choice(name: str, value, choices) -> None:
    valid = get_args(choices)
    if value not in valid:
        raise UserInputError(f"{name} must be one of {', '.join(valid)}, got {value!r}")


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


def _check_count(name: str, value, *, zero: bool = False) -> None:
    if (not isinstance(value, numbers.Integral) or isinstance(value, bool)
            or value < (0 if zero else 1)):
        kind = "a non-negative" if zero else "a positive"
        raise UserInputError(f"{name} must be {kind} integer, got {value!r}")


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


# Reranking (pipelines.rerank): at most this many candidates per image. 64 is the images-per-call
# limit (ldm_engine.limits.MAX_IMAGES), so the candidates of one image fit one call.
MAX_RERANK = 64
# Candidate j of the image with seed s has seed s + j * 2**24, the addition made in the seed's low
# 32 bits (modulo 2**32, the high bits kept). torch's CPU generator (mt19937) is seeded with
# those 32 bits only: seeds s and s + 2**32 draw the same noise, so a stride of 2**32 would make
# every candidate the same image. With 2**24, the 64 candidates of one image are distinct
# streams, and none is another image's seed s + k of the same call (A1111's convention) for
# calls of fewer than 2**24 images; a 32-bit seed (A1111's) has 32-bit candidate seeds.
RERANK_SEED_STRIDE = 2**24
_LOW = 2**32


def candidate_seed(seed: int, j: int) -> int:
    """The seed of candidate j (0-based) of the image whose seed is `seed` (j = 0: `seed`)."""
    seed = int(seed)
    return seed - seed % _LOW + (seed + j * RERANK_SEED_STRIDE) % _LOW


def check_rerank(rerank) -> None:
    """rerank is a whole number from 1 (no reranking) to MAX_RERANK."""
    if not isinstance(rerank, numbers.Integral) or isinstance(rerank, bool) or rerank < 1:
        raise UserInputError(f"rerank must be a positive integer (candidates per image; 1 = no "
                             f"reranking), got {rerank!r}")
    if rerank > MAX_RERANK:
        raise UserInputError(f"rerank {rerank} is more than {MAX_RERANK} candidates per image")


def check_no_rerank(request: GenerationParams, what: str) -> None:
    """Sequence modes make their images from one shared noise; reranking would break that."""
    check_rerank(request.rerank)
    if request.rerank != 1:
        raise UserInputError(f"rerank works image by image, but {what} share one noise and "
                             f"form one sequence (reranking them would break it): use rerank 1")


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
