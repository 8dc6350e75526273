"""Image-side preparation for the image-conditioned modes: img2img, inpaint, outpaint, hires fix,
variations and interpolation. Pure functions over PIL images and tensors; no networks.

Conventions, the ones AUTOMATIC1111 and diffusers share, so that their masks and settings carry
over:

- an image is a PIL "RGB" image; as a tensor it is (1, 3, H, W) float32 in [-1, 1], made exactly as
  diffusers' ``VaeImageProcessor`` makes it (``np.array / 255``, then ``2x - 1``);
- a mask is a PIL "L" image, white (255) = repaint, black (0) = keep; as a tensor (1, 1, H, W)
  float32 in [0, 1]; its latent-resolution version is binarised at 0.5 and nearest-resized, as
  diffusers' ``StableDiffusionInpaintPipeline`` does;
- a region is ``(x1, y1, x2, y2)`` in pixels, right and bottom exclusive (PIL's box convention).

Every bad input is a one-line ``UserInputError`` raised here, before any network runs.
"""

from __future__ import annotations

import math
import numbers
import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from ldm_engine.errors import UserInputError
from ldm_engine.fsutil import atomic_path

FitMode = Literal["just-resize", "crop", "fill"]
CanvasFill = Literal["edge", "noise", "color"]
Region = tuple[int, int, int, int]

# The containers an init image or a mask may come in. Fewer decoders, fewer parser bugs reachable
# from a file a user was sent; TIFF, BMP, GIF ... can be converted by any image tool first.
READ_FORMATS = ("PNG", "JPEG", "WEBP")
# Animation containers save_animation writes, by file suffix.
ANIMATION_FORMATS = {".gif": "GIF", ".webp": "WEBP"}
# Above this |cos| two vectors are treated as parallel: sin(omega) ~ 0 makes slerp's weights 0/0,
# and lerp is then within float error of slerp. The threshold A1111 (modules/rng.py) and most
# latent-walk scripts use.
SLERP_PARALLEL_COS = 0.9995
# The background RGBA pixels are composited onto: white, as A1111 does for transparent init images.
WHITE = (255, 255, 255)


class ImageConvertedWarning(UserWarning):
    """An input image or mask was converted to what the pipeline needs (the message says how)."""


# --- loading -------------------------------------------------------------------------------------

def _open(path: str | os.PathLike, what: str) -> Image.Image:
    """Open and fully decode an image file; every failure a one-line UserInputError."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x MAX_IMAGE_PIXELS; we refuse those as well: an
            # init image that large would not fit the denoiser anyway.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=list(READ_FORMATS)) as im:
                im.load()                   # decode now, so a truncated file fails here
                # Phones store JPEGs sideways with an EXIF rotation tag; show them upright, as
                # image viewers (and A1111's img2img upload) do.
                return ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise UserInputError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise UserInputError(f"{what} {path} is a folder, not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserInputError(f"refusing the {what} {path}: {e}") from None
    except Image.UnidentifiedImageError:
        raise UserInputError(f"cannot read the {what} {path}: not a "
                             f"{'/'.join(READ_FORMATS)} image") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error) as e:
        raise UserInputError(f"cannot read the {what} {path}: {e}") from None


def read_image_bytes(data: bytes, what: str = "image", *, max_pixels: int | None = None
                     ) -> Image.Image:
    """Decode an encoded PNG/JPEG/WebP held in memory (an upload); failures are one-line
    UserInputErrors. Its header's size is checked against max_pixels before a single pixel is
    decoded, so a small file that expands to gigabytes (a decompression bomb) costs nothing."""
    import io

    try:
        with Image.open(io.BytesIO(data), formats=list(READ_FORMATS)) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise UserInputError(f"the {what} is {im.width}x{im.height} = "
                                     f"{im.width * im.height} pixels; the limit is {max_pixels}")
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()
            image = ImageOps.exif_transpose(im)
    except UserInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserInputError(f"refusing the {what}: {e}") from None
    except Image.UnidentifiedImageError:
        raise UserInputError(f"cannot read the {what}: not a {'/'.join(READ_FORMATS)} "
                             "image") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error) as e:
        raise UserInputError(f"cannot read the {what}: {e}") from None
    return _as_image(image, what)


def _as_image(path_or_image, what: str) -> Image.Image:
    if isinstance(path_or_image, Image.Image):
        image = path_or_image
    elif isinstance(path_or_image, (str, os.PathLike)):
        image = _open(path_or_image, what)
    else:
        raise UserInputError(f"the {what} must be a file path or a PIL image, not "
                             f"{type(path_or_image).__name__}")
    if image.width < 1 or image.height < 1:
        raise UserInputError(f"the {what} is empty ({image.width}x{image.height})")
    return image


def _has_alpha(image: Image.Image) -> bool:
    return "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info


def _high_depth_to_l(image: Image.Image) -> tuple[Image.Image, str]:
    """A 16-bit, 32-bit integer or float single-channel image as 8-bit "L", and how it was scaled.

    PIL's own convert("L") clips such values at 255 (a 16-bit PNG turns almost white), so the
    scaling is done here. I;16 holds 0..65535: v8 = round(v16 * 255 / 65535) = round(v16 / 257).
    Mode I and F carry no declared range: integers above 255 are read as 16-bit, floats within
    [0, 1] as fractions, anything else as already 0..255 (clipped).
    """
    a = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        scale, how = 255.0 / 65535.0, "16-bit values scaled to 8 bits"
    elif image.mode == "I" and a.max(initial=0) > 255:
        scale, how = 255.0 / 65535.0, "32-bit integers read as 16-bit and scaled to 8 bits"
    elif image.mode == "F" and a.min(initial=0) >= 0 and a.max(initial=0) <= 1:
        scale, how = 255.0, "floats in [0, 1] scaled to 8 bits"
    else:
        scale, how = 1.0, "values clipped to 0..255"
    a = np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(a), how


def load_image(path_or_image: str | os.PathLike | Image.Image, what: str = "init image"
               ) -> Image.Image:
    """The image as 8-bit RGB; a non-RGB input is converted with an ImageConvertedWarning.

    Transparent images (RGBA, LA, P with a transparent colour) are composited onto white;
    grayscale, palette, CMYK and YCbCr go through PIL's conversion; 16-bit and float images are
    scaled to 8 bits first (``_high_depth_to_l``). ``what`` names the image in messages.
    """
    image = _as_image(path_or_image, what)
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image.copy() if image is path_or_image else image
    if _has_alpha(image):
        # out = rgb * alpha + white * (1 - alpha), per pixel: alpha_composite is exact at alpha
        # 0 (white) and 255 (the pixel itself).
        background = Image.new("RGBA", image.size, WHITE + (255,))
        rgb = Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
        how = "its alpha was composited onto white"
    elif mode.startswith("I") or mode == "F":
        gray, how = _high_depth_to_l(image)
        rgb = gray.convert("RGB")
        how = f"converted to RGB ({how})"
    else:
        rgb = image.convert("RGB")
        how = "converted to RGB"
    warnings.warn(ImageConvertedWarning(f"{what} is {mode}; {how}"), stacklevel=2)
    return rgb


def load_mask(path_or_image: str | os.PathLike | Image.Image, *, invert: bool = False
              ) -> Image.Image:
    """The mask as "L": white (255) = repaint, black (0) = keep (A1111 and diffusers alike).

    A mask with alpha (RGBA, LA, P with transparency) whose colour is one constant value is a
    painted-transparency mask: its alpha is the mask (opaque = repaint). Otherwise its luminance
    is used (ITU-R 601: L = 0.299 R + 0.587 G + 0.114 B, PIL's convert("L")), and the warning says
    which. RGB with R = G = B everywhere is read as gray without a warning (nothing is lost).
    invert swaps repaint and keep (255 - v), for masks drawn the other way round.
    """
    image = _as_image(path_or_image, "mask")
    mode = image.mode
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        a = np.asarray(rgba)
        colour = a[..., :3].reshape(-1, 3)
        if (colour == colour[0]).all():
            mask = rgba.getchannel("A")
            how = "its colour is constant, so its alpha channel is the mask (opaque = repaint)"
        else:
            mask = rgba.convert("RGB").convert("L")
            how = "its luminance is the mask (alpha ignored)"
        warnings.warn(ImageConvertedWarning(f"mask is {mode}; {how}"), stacklevel=2)
    elif mode == "L":
        mask = image.copy() if image is path_or_image else image
    elif mode == "1":
        mask = image.convert("L")           # 0/1 -> 0/255 exactly
    elif mode.startswith("I") or mode == "F":
        mask, how = _high_depth_to_l(image)
        warnings.warn(ImageConvertedWarning(f"mask is {mode}; {how}"), stacklevel=2)
    else:
        rgb = image.convert("RGB")
        a = np.asarray(rgb)
        mask = rgb.convert("L")
        if not ((a[..., 0] == a[..., 1]) & (a[..., 1] == a[..., 2])).all():
            warnings.warn(ImageConvertedWarning(f"mask is {mode} with colours; its luminance "
                                                "is the mask"), stacklevel=2)
    if not isinstance(invert, bool):
        raise UserInputError(f"invert must be True or False, not {invert!r}")
    return ImageOps.invert(mask) if invert else mask


# --- resizing ------------------------------------------------------------------------------------

def _check_size(width, height, what: str = "size") -> None:
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
            raise UserInputError(f"{what}: {name} must be a positive integer, not {v!r}")


def fit_image(image: Image.Image, width: int, height: int, mode: FitMode) -> Image.Image:
    """Resize to exactly (width, height) by one of A1111's img2img resize modes.

    (modules/images.py ``resize_image``; all three use Lanczos.)

    - "just-resize" ("Just resize"): stretch to the size; the aspect ratio is not kept.
    - "crop" ("Crop and resize"): scale so the image covers the size, then cut the centre.
    - "fill" ("Resize and fill"): scale so the image fits inside, centre it, and fill each empty
      band by stretching the image's outermost row (or column) across it.

    Scaled sizes are A1111's integer arithmetic: the side that must match is the target's, the
    other is ``src_other * target // src_side`` (floor); offsets are ``target // 2 - scaled // 2``.
    Two deliberate differences in "fill": each band here is exactly the edge row/column repeated
    (A1111 resizes a zero-height box with Lanczos, which mixes in the two rows next to the edge),
    and the band below/right is filled to its own height, where A1111 leaves one row black when
    the two bands differ in size. For RGB images and "L" masks alike; the mode is kept.
    """
    if not isinstance(image, Image.Image) or image.mode not in ("RGB", "L"):
        raise UserInputError("fit_image needs an RGB image or an 'L' mask (use load_image or "
                             "load_mask first)")
    _check_size(width, height, "fit_image")
    if mode not in get_args(FitMode):
        raise UserInputError(f"unknown resize mode {mode!r}; choose one of "
                             f"{', '.join(get_args(FitMode))}")
    lanczos = Image.Resampling.LANCZOS
    if mode == "just-resize":
        return image.resize((width, height), resample=lanczos)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == "crop":
        # Cover: match the side that is relatively shorter in the source.
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
        resized = image.resize((src_w, src_h), resample=lanczos)
        left, top = src_w // 2 - width // 2, src_h // 2 - height // 2
        return resized.crop((left, top, left + width, top + height))
    # Fit inside: match the side that is relatively longer in the source.
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    # A very thin source can floor to 0 along its short side; keep at least one row/column.
    src_w, src_h = max(src_w, 1), max(src_h, 1)
    resized = np.asarray(image.resize((src_w, src_h), resample=lanczos))
    left, top = width // 2 - src_w // 2, height // 2 - src_h // 2
    pad = [(top, height - top - src_h), (left, width - left - src_w)]   # (before, after) per axis
    pad += [(0, 0)] * (resized.ndim - 2)                                  # RGB: not the channels
    return Image.fromarray(np.pad(resized, pad, mode="edge"))


# --- tensors -------------------------------------------------------------------------------------

def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as (1, 3, H, W) float32 in [-1, 1]: x = 2 * (v / 255) - 1, as diffusers."""
    if not isinstance(image, Image.Image) or image.mode != "RGB":
        raise UserInputError("to_tensor needs an RGB PIL image (use load_image first)")
    x = np.asarray(image).astype(np.float32) / 255.0             # (H, W, 3) in [0, 1]
    x = torch.from_numpy(x).permute(2, 0, 1).unsqueeze(0)        # (1, 3, H, W)
    return (2.0 * x - 1.0).contiguous()


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """An "L" mask as (1, 1, H, W) float32 in [0, 1] (v / 255), not binarised."""
    if not isinstance(mask, Image.Image) or mask.mode != "L":
        raise UserInputError("mask_to_tensor needs an 'L' PIL image (use load_mask first)")
    m = np.asarray(mask).astype(np.float32) / 255.0              # (H, W)
    return torch.from_numpy(m)[None, None].contiguous()          # (1, 1, H, W)


def binarize(mask: torch.Tensor) -> torch.Tensor:
    """0 where mask < 0.5, else 1 (diffusers' VaeImageProcessor.binarize), as a new tensor."""
    return (mask >= 0.5).to(mask.dtype)


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """The (B, 1, H/f, W/f) mask at latent resolution, as diffusers' inpaint pipeline makes it.

    Its mask processor binarises the pixel mask (do_binarize) and prepare_mask_latents shrinks it
    with ``F.interpolate(mask, size=(H // f, W // f))``, whose default mode is "nearest": each
    latent takes the pixel at floor(i * f) of its block, i.e. the block's top-left pixel.
    """
    if not isinstance(factor, numbers.Integral) or isinstance(factor, bool) or factor < 1:
        raise UserInputError(f"the latent factor must be a positive integer, not {factor!r}")
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise UserInputError(f"a mask tensor is (B, 1, H, W), not {tuple(mask.shape)}")
    h, w = mask.shape[-2:]
    if h % factor or w % factor:
        raise UserInputError(f"the mask is {w}x{h}: width and height must be multiples of "
                             f"{factor} to line up with the latents")
    return torch.nn.functional.interpolate(binarize(mask), size=(h // factor, w // factor))


# --- mask blur and "only masked" ----------------------------------------------------------------

def blur_mask(mask: Image.Image, radius: float) -> Image.Image:
    """A1111's "Mask blur": a Gaussian of standard deviation ``radius`` pixels; 0 = unchanged.

    PIL's GaussianBlur approximates the Gaussian with three box blurs (extended box filter).
    """
    if (not isinstance(radius, numbers.Real) or isinstance(radius, bool)
            or not math.isfinite(radius) or radius < 0):
        raise UserInputError(f"mask blur must be a number >= 0, not {radius!r}")
    if radius == 0:
        return mask.copy()
    return mask.filter(ImageFilter.GaussianBlur(radius))


def crop_region(mask: Image.Image, padding: int = 0) -> Region:
    """The bounding box of the mask's nonzero pixels, grown by padding and clamped to the image.

    A1111's ``masking.get_crop_region`` (Inpaint area: Only masked; "Only masked padding"). Take
    it from the blurred mask, as A1111 does, so the blur's fringe is inside the crop.
    """
    if not isinstance(padding, numbers.Integral) or isinstance(padding, bool) or padding < 0:
        raise UserInputError(f"the padding must be an integer >= 0, not {padding!r}")
    box = mask.convert("L").getbbox()
    if box is None:
        raise UserInputError("the mask is empty: nothing to inpaint (white marks what to repaint)")
    x1, y1, x2, y2 = box
    return (max(x1 - padding, 0), max(y1 - padding, 0),
            min(x2 + padding, mask.width), min(y2 + padding, mask.height))


def expand_to_aspect(region: Region, width: int, height: int, image_w: int, image_h: int
                     ) -> Region:
    """Grow region towards the generation's aspect ratio width:height, inside the image.

    A1111's ``masking.expand_crop_region``: the short side grows by
    floor(long * aspect) - short, split evenly (the extra pixel after), then the region is slid
    back inside the image and, if it is still too big, clamped. Exact integer arithmetic here
    (A1111 divides floats, which can land one pixel off on an exact quotient).
    """
    _check_size(width, height, "expand_to_aspect")
    _check_size(image_w, image_h, "expand_to_aspect image")
    x1, y1, x2, y2 = region
    if not (0 <= x1 < x2 <= image_w and 0 <= y1 < y2 <= image_h):
        raise UserInputError(f"the region {tuple(region)} is not inside the "
                             f"{image_w}x{image_h} image")

    def grow(lo: int, hi: int, diff: int, limit: int) -> tuple[int, int]:
        lo, hi = lo - diff // 2, hi + diff - diff // 2
        if hi > limit:                      # slide back inside...
            lo, hi = lo - (hi - limit), limit
        if lo < 0:
            lo, hi = 0, hi - lo
        return lo, min(hi, limit)           # ...and clamp what still does not fit

    w, h = x2 - x1, y2 - y1
    if w * height > h * width:              # wider than the generation: grow the height
        y1, y2 = grow(y1, y2, w * height // width - h, image_h)
    else:
        x1, x2 = grow(x1, x2, h * width // height - w, image_w)
    return x1, y1, x2, y2


def paste_back(original: Image.Image, generated_crop: Image.Image, region: Region,
               mask: Image.Image) -> Image.Image:
    """Put an "only masked" generation back: resize it to the region, paste, blend by the mask.

    out = generated * m + original * (1 - m) per pixel, m = mask / 255 (the blurred mask, full
    image size). PIL's composite is exact at m = 0 and m = 1, so every pixel the mask keeps is the
    original's, bit for bit. The crop is resized with fit_image "crop", as A1111's apply_overlay
    does (the region already has the generation's aspect ratio, so little or nothing is cut).
    """
    if original.mode != "RGB" or generated_crop.mode != "RGB":
        raise UserInputError("paste_back needs RGB images (use load_image first)")
    if mask.mode != "L" or mask.size != original.size:
        raise UserInputError(f"paste_back needs an 'L' mask the size of the original "
                             f"({original.width}x{original.height}), not {mask.mode} "
                             f"{mask.width}x{mask.height}")
    x1, y1, x2, y2 = region
    if not (0 <= x1 < x2 <= original.width and 0 <= y1 < y2 <= original.height):
        raise UserInputError(f"the region {tuple(region)} is not inside the "
                             f"{original.width}x{original.height} image")
    pasted = original.copy()
    pasted.paste(fit_image(generated_crop, x2 - x1, y2 - y1, "crop"), (x1, y1))
    return Image.composite(pasted, original, mask)


# --- outpainting --------------------------------------------------------------------------------

def extend_canvas(image: Image.Image, *, left: int = 0, right: int = 0, top: int = 0,
                  bottom: int = 0, fill: CanvasFill = "edge",
                  color: tuple[int, int, int] = (127, 127, 127), seed: int = 0,
                  overlap: int = 0) -> tuple[Image.Image, Image.Image]:
    """A larger canvas for outpainting, and its mask (white over what is to be painted).

    The image sits at (left, top) of a (W + left + right) x (H + top + bottom) canvas. The new
    border is filled with ``fill``: "edge" repeats the image's outermost pixels outwards (so the
    VAE sees continuous colour), "noise" is uniform 0..255 RGB from a CPU torch.Generator seeded
    with ``seed``, "color" is one solid colour. The mask covers the border plus ``overlap`` pixels
    into the image along each extended side, so the seam itself is repainted.
    """
    if image.mode != "RGB":
        raise UserInputError("extend_canvas needs an RGB image (use load_image first)")
    amounts = {"left": left, "right": right, "top": top, "bottom": bottom, "overlap": overlap}
    for name, v in amounts.items():
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 0:
            raise UserInputError(f"outpaint {name} must be an integer >= 0, not {v!r}")
    if left == right == top == bottom == 0:
        raise UserInputError("outpainting needs at least one of left, right, top, bottom > 0")
    if fill not in get_args(CanvasFill):
        raise UserInputError(f"unknown outpaint fill {fill!r}; choose one of "
                             f"{', '.join(get_args(CanvasFill))}")
    w, h = image.size
    cw, ch = w + left + right, h + top + bottom
    if cw * ch > Image.MAX_IMAGE_PIXELS:
        raise UserInputError(f"the outpainted canvas would be {cw}x{ch}, over PIL's limit of "
                             f"{Image.MAX_IMAGE_PIXELS} pixels")
    # The part of the original that is kept: shrunk by overlap on every side that was extended.
    kx1, ky1 = left and overlap, top and overlap
    kx2, ky2 = w - (right and overlap), h - (bottom and overlap)
    if kx1 >= kx2 or ky1 >= ky2:
        raise UserInputError(f"an overlap of {overlap} px leaves nothing of the {w}x{h} image")

    src = np.asarray(image)                                        # (H, W, 3) uint8
    if fill == "edge":
        canvas = np.pad(src, ((top, bottom), (left, right), (0, 0)), mode="edge")
    else:
        if fill == "noise":
            g = torch.Generator(device="cpu").manual_seed(int(seed))
            canvas = torch.randint(0, 256, (ch, cw, 3), generator=g, dtype=torch.uint8).numpy()
        else:
            if (not isinstance(color, Sequence) or len(color) != 3
                    or not all(isinstance(c, numbers.Integral) and 0 <= c <= 255 for c in color)):
                raise UserInputError(f"the outpaint colour must be three integers 0..255, "
                                     f"not {color!r}")
            canvas = np.empty((ch, cw, 3), dtype=np.uint8)
            canvas[...] = np.asarray(color, dtype=np.uint8)
        canvas[top:top + h, left:left + w] = src
    mask = np.full((ch, cw), 255, dtype=np.uint8)
    mask[top + ky1:top + ky2, left + kx1:left + kx2] = 0
    return Image.fromarray(canvas), Image.fromarray(mask)


# --- interpolation -------------------------------------------------------------------------------

def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical linear interpolation between a and b, per batch row (dim 0), each row flattened.

    Shoemake 1985, "Animating rotation with quaternion curves", eq. for Slerp:

        omega = arccos(<a, b> / (|a| |b|))
        slerp(a, b; t) = sin((1 - t) omega) / sin(omega) * a + sin(t omega) / sin(omega) * b

    For two Gaussian latents of the same norm the result keeps that norm, where lerp would shrink
    it by up to 1/sqrt(2) at t = 0.5 (two near-orthogonal high-dimensional vectors) and the
    denoiser would see a latent that is too quiet. Rows with |cos omega| > 0.9995 (or a zero row)
    use lerp, (1 - t) a + t b. t = 0 and t = 1 return copies of a and b exactly. The sum is
    computed in float64 (float32 on MPS); the result has a's dtype and device. A 1-D input is
    one row.
    """
    if a.shape != b.shape:
        raise UserInputError(f"slerp needs tensors of one shape, not {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
    if not isinstance(t, numbers.Real) or isinstance(t, bool) or not math.isfinite(t):
        raise UserInputError(f"slerp's t must be a finite number, not {t!r}")
    if t == 0:
        return a.clone()
    if t == 1:
        return b.clone()
    rows = 1 if a.ndim <= 1 else a.shape[0]
    work = torch.float32 if a.device.type == "mps" else torch.float64   # MPS has no float64
    a64 = a.reshape(rows, -1).to(work)                             # (B, D)
    b64 = b.to(a.device).reshape(rows, -1).to(work)
    norms = a64.norm(dim=1) * b64.norm(dim=1)                      # (B,)
    cos = (a64 * b64).sum(dim=1) / norms.clamp_min(torch.finfo(work).tiny)
    cos = cos.clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin_omega = torch.sin(omega)
    parallel = (cos.abs() > SLERP_PARALLEL_COS) | (norms == 0)
    safe_sin = torch.where(parallel, torch.ones_like(sin_omega), sin_omega)
    wa = torch.where(parallel, torch.full_like(cos, 1.0 - t),
                     torch.sin((1.0 - t) * omega) / safe_sin)
    wb = torch.where(parallel, torch.full_like(cos, t), torch.sin(t * omega) / safe_sin)
    out = wa[:, None] * a64 + wb[:, None] * b64                    # (B, D)
    return out.reshape(a.shape).to(a.dtype)


# --- grids and animations ------------------------------------------------------------------------

def _check_frames(images: Sequence[Image.Image], what: str) -> None:
    if isinstance(images, Image.Image) or not isinstance(images, Sequence) or not images:
        raise UserInputError(f"{what} needs a non-empty list of images")
    if not all(isinstance(im, Image.Image) for im in images):
        raise UserInputError(f"{what} needs PIL images")
    size = images[0].size
    if any(im.size != size for im in images):
        sizes = sorted({f"{im.width}x{im.height}" for im in images})
        raise UserInputError(f"{what} needs images of one size, not {', '.join(sizes)}")


def image_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """The images tiled row by row, ``cols`` per row (default ceil(sqrt(n))), black where short.

    The grid has the first image's mode; every image must have the same size.
    """
    _check_frames(images, "image_grid")
    n = len(images)
    if cols is None:
        cols = math.ceil(math.sqrt(n))
    if not isinstance(cols, numbers.Integral) or isinstance(cols, bool) or cols < 1:
        raise UserInputError(f"the grid's columns must be a positive integer, not {cols!r}")
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    w, h = images[0].size
    grid = Image.new(images[0].mode, (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im.convert(grid.mode), ((i % cols) * w, (i // cols) * h))
    return grid


def save_animation(images: Sequence[Image.Image], path: str | os.PathLike, *,
                   duration_ms: int = 100, loop: int = 0) -> None:
    """Write the frames as an animated GIF or WebP (by the path's suffix), atomically.

    duration_ms is each frame's display time; loop is the number of repeats, 0 = forever. GIF
    stores durations in 10 ms units and 256 colours per frame (PIL quantises each frame), and
    PIL merges identical consecutive GIF frames into one longer frame. WebP is lossy, quality 90.
    """
    _check_frames(images, "save_animation")
    dest = Path(path)
    fmt = ANIMATION_FORMATS.get(dest.suffix.lower())
    if fmt is None:
        raise UserInputError(f"cannot write an animation to {dest.name}: the name must end in "
                             f"{' or '.join(ANIMATION_FORMATS)}")
    for name, v, low in (("duration_ms", duration_ms, 1), ("loop", loop, 0)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < low:
            raise UserInputError(f"{name} must be an integer >= {low}, not {v!r}")
    frames = [im.convert("RGB") for im in images]
    options = {"quality": 90} if fmt == "WEBP" else {}
    with atomic_path(dest) as tmp:
        frames[0].save(tmp, format=fmt, save_all=True, append_images=frames[1:],
                       duration=int(duration_ms), loop=int(loop), **options)
