"""pipelines.images: loading, A1111's resize modes, diffusers' mask tensors, inpaint crops,
outpaint canvases, slerp, grids and animations. Pure CPU, tiny images."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from ldm_engine.errors import UserInputError
from pipelines.images import (ImageConvertedWarning, binarize, blur_mask, crop_region,
                              expand_to_aspect, extend_canvas, fit_image, image_grid, latent_mask,
                              load_image, load_mask, mask_to_tensor, paste_back, save_animation,
                              slerp, to_tensor)


def _rgb(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _quiet(fn, *args, **kwargs):
    """Call fn with every warning an error: the no-conversion paths must not warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


# --- load_image --------------------------------------------------------------------------------

def test_rgb_file_loads_unchanged_and_silently(tmp_path):
    im = _rgb(12, 8)
    im.save(tmp_path / "a.png")
    out = _quiet(load_image, tmp_path / "a.png")
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(im))


def test_rgba_is_composited_onto_white_with_a_warning():
    a = np.zeros((2, 3, 4), dtype=np.uint8)
    a[..., :3] = (10, 20, 30)
    a[0, 0, 3], a[0, 1, 3], a[0, 2, 3] = 0, 255, 128         # transparent, opaque, half
    with pytest.warns(ImageConvertedWarning, match="init image is RGBA; its alpha was "
                                                   "composited onto white"):
        out = np.asarray(load_image(Image.fromarray(a)))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 20, 30]
    expected = [round(c * 128 / 255 + 255 * 127 / 255) for c in (10, 20, 30)]
    assert np.abs(out[0, 2].astype(int) - expected).max() <= 1


@pytest.mark.parametrize("mode", ["LA", "P"])
def test_other_transparent_modes_are_composited(mode):
    if mode == "LA":
        im = Image.fromarray(np.array([[[50, 0], [50, 255]]], dtype=np.uint8), mode="LA")
    else:
        im = Image.new("P", (2, 1))
        im.putpalette([50, 50, 50] * 256)
        im.putpixel((0, 0), 1)
        im.info["transparency"] = 1                            # palette index 1 is transparent
    with pytest.warns(ImageConvertedWarning, match=f"is {mode}; its alpha"):
        out = np.asarray(load_image(im))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [50, 50, 50]


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "YCbCr"])
def test_non_rgb_modes_are_converted_with_a_warning(mode):
    im = _rgb(4, 4).convert(mode)
    with pytest.warns(ImageConvertedWarning, match=f"init image is {mode}; converted to RGB"):
        out = load_image(im)
    assert out.mode == "RGB" and out.size == (4, 4)
    assert np.array_equal(np.asarray(out), np.asarray(im.convert("RGB")))


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    v16 = np.array([[0, 257, 257 * 128], [257 * 200, 65535, 65535 - 128]], dtype=np.uint16)
    Image.fromarray(v16).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode == "I;16"
    with pytest.warns(ImageConvertedWarning, match="16-bit values scaled to 8 bits"):
        out = np.asarray(load_image(tmp_path / "d.png"))
    assert out[..., 0].tolist() == [[0, 1, 128], [200, 255, 255]]
    assert (out[..., 0] == out[..., 2]).all()


def test_exif_rotation_is_applied(tmp_path):
    im = _rgb(8, 4)
    exif = im.getexif()
    exif[0x0112] = 6                                            # "rotate 90 CW to view"
    im.save(tmp_path / "r.jpg", exif=exif)
    assert _quiet(load_image, tmp_path / "r.jpg").size == (4, 8)


def test_bad_files_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(UserInputError, match="init image not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(UserInputError, match="not a PNG/JPEG/WEBP image"):
        load_image(tmp_path / "junk.png")
    _rgb(8, 8).save(tmp_path / "a.bmp")
    with pytest.raises(UserInputError, match="not a PNG/JPEG/WEBP image"):
        load_image(tmp_path / "a.bmp")
    _rgb(64, 64).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError, match="cannot read the init image"):
        load_image(tmp_path / "t.png")
    with pytest.raises(UserInputError, match="must be a file path or a PIL image"):
        load_image(123)
    _rgb(40, 40).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)       # 1600 px: only a warning in PIL
    with pytest.raises(UserInputError, match="refusing the mask"):
        load_mask(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)        # over 2x: PIL's error
    with pytest.raises(UserInputError, match="refusing the init image"):
        load_image(tmp_path / "big.png")


# --- load_mask ---------------------------------------------------------------------------------

def test_mask_modes():
    gray = Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8))
    assert np.array_equal(np.asarray(_quiet(load_mask, gray)), [[0, 100, 255]])
    assert np.array_equal(np.asarray(_quiet(load_mask, gray, invert=True)), [[255, 155, 0]])
    assert np.array_equal(np.asarray(_quiet(load_mask, gray.convert("RGB"))), [[0, 100, 255]])
    assert np.array_equal(np.asarray(_quiet(load_mask, gray.convert("1"))), [[0, 0, 255]])

    painted = np.zeros((1, 3, 4), dtype=np.uint8)              # one colour, alpha painted
    painted[0, :, 3] = [0, 90, 255]
    with pytest.warns(ImageConvertedWarning, match="alpha channel is the mask"):
        m = load_mask(Image.fromarray(painted))
    assert np.array_equal(np.asarray(m), [[0, 90, 255]])

    coloured = painted.copy()
    coloured[0, :, :3] = [[0, 0, 0], [255, 255, 255], [255, 0, 0]]
    with pytest.warns(ImageConvertedWarning, match="luminance is the mask"):
        m = load_mask(Image.fromarray(coloured))
    assert np.asarray(m).tolist() == [[0, 255, 76]]            # 0.299 * 255 = 76.2

    with pytest.warns(ImageConvertedWarning, match="with colours"):
        load_mask(Image.fromarray(coloured[..., :3]))


# --- fit_image ---------------------------------------------------------------------------------

def _a1111_canvas_crop(image, width, height):
    """Reference "Crop and resize": paste the covering resize at A1111's (negative) offset."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    res = Image.new(image.mode, (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return res


@pytest.mark.parametrize("src", [(40, 20), (20, 40), (33, 33), (7, 50)])
@pytest.mark.parametrize("dst", [(32, 32), (48, 16), (16, 40), (31, 17)])
def test_fit_image_sizes_and_a1111_parity(src, dst):
    im = _rgb(*src)
    for mode in ("just-resize", "crop", "fill"):
        out = fit_image(im, *dst, mode)
        assert out.size == dst and out.mode == "RGB"
        assert fit_image(im.convert("L"), *dst, mode).mode == "L"
    assert np.array_equal(np.asarray(fit_image(im, *dst, "just-resize")),
                          np.asarray(im.resize(dst, resample=Image.Resampling.LANCZOS)))
    assert np.array_equal(np.asarray(fit_image(im, *dst, "crop")),
                          np.asarray(_a1111_canvas_crop(im, *dst)))


def test_crop_keeps_the_centre_pixels():
    im = _rgb(64, 32)
    out = np.asarray(fit_image(im, 32, 32, "crop"))             # scale 1: a pure centre cut
    assert np.array_equal(out, np.asarray(im)[:, 16:48])
    out = np.asarray(fit_image(im, 16, 16, "crop"))             # scale 1/2, then the centre
    half = np.asarray(im.resize((32, 16), resample=Image.Resampling.LANCZOS))
    assert np.array_equal(out, half[:, 8:24])


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_fill_bands_are_the_edge_pixels(mode):
    im = _rgb(16, 8).convert(mode)
    out = np.asarray(fit_image(im, 16, 13, "fill"))             # bands of 2 (top) and 3 (bottom)
    centre = np.asarray(im)                                     # 16 wide already: not resized
    assert np.array_equal(out[2:10], centre)
    assert all(np.array_equal(out[r], centre[0]) for r in range(2))
    assert all(np.array_equal(out[r], centre[-1]) for r in range(10, 13))

    tall = _rgb(8, 16).convert(mode)                            # columns: fit 8x16 into 20x16
    out = np.asarray(fit_image(tall, 20, 16, "fill"))
    left = 10 - 4
    assert np.array_equal(out[:, left:left + 8], np.asarray(tall))
    assert all(np.array_equal(out[:, c], np.asarray(tall)[:, 0]) for c in range(left))
    assert all(np.array_equal(out[:, c], np.asarray(tall)[:, -1]) for c in range(left + 8, 20))


def test_fit_image_refuses_bad_arguments():
    with pytest.raises(UserInputError, match="unknown resize mode 'stretch'"):
        fit_image(_rgb(4, 4), 8, 8, "stretch")
    with pytest.raises(UserInputError, match="width must be a positive integer"):
        fit_image(_rgb(4, 4), 0, 8, "crop")
    with pytest.raises(UserInputError, match="RGB image or an 'L' mask"):
        fit_image(_rgb(4, 4).convert("RGBA"), 8, 8, "crop")


# --- tensors: parity with diffusers -------------------------------------------------------------

def test_tensors_match_diffusers_processing():
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import (
        StableDiffusionInpaintPipeline)

    h, w, f = 24, 40, 8
    image = _rgb(w, h)
    x = to_tensor(image)
    ref = VaeImageProcessor(vae_scale_factor=f).preprocess(image, height=h, width=w)
    assert x.shape == (1, 3, h, w) and x.dtype == torch.float32
    assert torch.equal(x, ref)

    rng = np.random.default_rng(1)
    mask = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
    m = mask_to_tensor(mask)
    raw = VaeImageProcessor(vae_scale_factor=f, do_normalize=False,
                            do_convert_grayscale=True).preprocess(mask, height=h, width=w)
    assert m.shape == (1, 1, h, w) and torch.equal(m, raw)
    assert m.min() >= 0 and m.max() <= 1

    # The inpaint pipeline's own mask path: its mask processor (binarise), then
    # prepare_mask_latents (nearest interpolate). A 4-channel masked image skips the VAE.
    pipe = StableDiffusionInpaintPipeline.__new__(StableDiffusionInpaintPipeline)
    object.__setattr__(pipe, "vae_scale_factor", f)
    processor = VaeImageProcessor(vae_scale_factor=f, do_normalize=False, do_binarize=True,
                                  do_convert_grayscale=True)
    condition = processor.preprocess(mask, height=h, width=w)
    assert torch.equal(binarize(m), condition)
    ref_mask, _ = StableDiffusionInpaintPipeline.prepare_mask_latents(
        pipe, condition, torch.zeros(1, 4, h // f, w // f), 1, h, w, torch.float32, "cpu", None,
        False)
    lm = latent_mask(m, f)
    assert lm.shape == (1, 1, h // f, w // f)
    assert torch.equal(lm, ref_mask)
    assert torch.equal(lm, binarize(m)[:, :, ::f, ::f])         # nearest = each block's top-left


def test_tensor_input_checks():
    with pytest.raises(UserInputError, match="RGB PIL image"):
        to_tensor(_rgb(4, 4).convert("L"))
    with pytest.raises(UserInputError, match="'L' PIL image"):
        mask_to_tensor(_rgb(4, 4))
    with pytest.raises(UserInputError, match="multiples of 8"):
        latent_mask(torch.zeros(1, 1, 12, 16), 8)
    assert torch.equal(binarize(torch.tensor([0.0, 0.49, 0.5, 1.0])),
                       torch.tensor([0.0, 0.0, 1.0, 1.0]))


# --- blur, crop region, paste back --------------------------------------------------------------

def test_blur_mask():
    a = np.zeros((32, 32), dtype=np.uint8)
    a[:, 16:] = 255
    mask = Image.fromarray(a)
    assert np.array_equal(np.asarray(blur_mask(mask, 0)), a)
    b = np.asarray(blur_mask(mask, 3)).astype(int)
    row = b[16]
    assert (np.diff(row) >= 0).all()                            # a step stays monotone
    assert row[0] == 0 and row[-1] == 255 and 0 < row[15] < 255 and 0 < row[16] < 255
    assert abs(b.sum() - a.astype(int).sum()) / a.sum() < 0.01   # mass kept
    with pytest.raises(UserInputError, match="mask blur must be a number >= 0"):
        blur_mask(mask, -1)


def test_crop_region_and_empty_mask():
    a = np.zeros((40, 60), dtype=np.uint8)
    a[10:20, 30:35] = 255
    mask = Image.fromarray(a)
    assert crop_region(mask, 0) == (30, 10, 35, 20)
    assert crop_region(mask, 4) == (26, 6, 39, 24)
    assert crop_region(mask, 100) == (0, 0, 60, 40)
    with pytest.raises(UserInputError, match="the mask is empty: nothing to inpaint"):
        crop_region(Image.new("L", (8, 8)), 0)


def _a1111_expand(region, pw, ph, iw, ih):
    """Reference: A1111 masking.expand_crop_region in its float form (y branch and x branch)."""
    x1, y1, x2, y2 = region
    if (x2 - x1) / (y2 - y1) > pw / ph:
        d = int((x2 - x1) / (pw / ph) - (y2 - y1))
        y1, y2 = y1 - d // 2, y2 + d - d // 2
        if y2 >= ih:
            y1, y2 = y1 - (y2 - ih), ih
        if y1 < 0:
            y1, y2 = 0, y2 - y1
        y2 = min(y2, ih)
    else:
        d = int((y2 - y1) * (pw / ph) - (x2 - x1))
        x1, x2 = x1 - d // 2, x2 + d - d // 2
        if x2 >= iw:
            x1, x2 = x1 - (x2 - iw), iw
        if x1 < 0:
            x1, x2 = 0, x2 - x1
        x2 = min(x2, iw)
    return x1, y1, x2, y2


def test_expand_to_aspect_matches_a1111():
    rng = np.random.default_rng(2)
    for _ in range(300):
        iw, ih = (int(v) for v in rng.integers(16, 200, 2))
        x1, x2 = sorted(int(v) for v in rng.choice(iw + 1, 2, replace=False))
        y1, y2 = sorted(int(v) for v in rng.choice(ih + 1, 2, replace=False))
        pw, ph = (int(v) * 8 for v in rng.choice([48, 64, 96], 2))
        got = expand_to_aspect((x1, y1, x2, y2), pw, ph, iw, ih)
        assert got == _a1111_expand((x1, y1, x2, y2), pw, ph, iw, ih)
        gx1, gy1, gx2, gy2 = got
        assert 0 <= gx1 < gx2 <= iw and 0 <= gy1 < gy2 <= ih
        assert gx1 <= x1 and gy1 <= y1 and gx2 >= x2 and gy2 >= y2
    assert expand_to_aspect((10, 10, 30, 15), 512, 512, 100, 100) == (10, 3, 30, 23)


def test_paste_back_keeps_pixels_outside_the_mask_exactly():
    original, generated = _rgb(48, 32, seed=3), _rgb(64, 64, seed=4)
    a = np.zeros((32, 48), dtype=np.uint8)
    a[8:20, 10:30] = 255
    mask = blur_mask(Image.fromarray(a), 2)
    region = expand_to_aspect(crop_region(mask, 4), 64, 64, 48, 32)
    out = np.asarray(paste_back(original, generated, region, mask))
    m = np.asarray(mask)
    keep = m == 0
    assert keep.any() and np.array_equal(out[keep], np.asarray(original)[keep])
    x1, y1, x2, y2 = region
    crop = np.asarray(fit_image(generated, x2 - x1, y2 - y1, "crop"))
    full = m == 255
    assert full.any()
    ys, xs = np.nonzero(full)
    assert np.array_equal(out[ys, xs], crop[ys - y1, xs - x1])
    with pytest.raises(UserInputError, match="the size of the original"):
        paste_back(original, generated, region, mask.resize((10, 10)))


# --- outpainting -------------------------------------------------------------------------------

def test_extend_canvas_edge_sizes_and_mask():
    im = _rgb(20, 10)
    canvas, mask = extend_canvas(im, left=4, bottom=6, overlap=2)
    assert canvas.size == mask.size == (24, 16) and canvas.mode == "RGB" and mask.mode == "L"
    c, m, src = np.asarray(canvas), np.asarray(mask), np.asarray(im)
    assert np.array_equal(c[0:10, 4:24], src)
    assert all(np.array_equal(c[0:10, k], src[:, 0]) for k in range(4))     # edge: left column
    assert all(np.array_equal(c[10 + k, 4:], src[-1]) for k in range(6))    # and bottom row
    assert set(np.unique(m)) == {0, 255}
    # Kept: the original less 2 px on its extended sides (left, bottom), 18 x 8.
    assert (m == 0).sum() == 18 * 8 and (m[0:8, 6:24] == 0).all()
    assert (m[:, :6] == 255).all() and (m[8:] == 255).all()


def test_extend_canvas_noise_and_color():
    im = _rgb(8, 8)
    a, _ = extend_canvas(im, top=4, fill="noise", seed=5)
    b, _ = extend_canvas(im, top=4, fill="noise", seed=5)
    c, _ = extend_canvas(im, top=4, fill="noise", seed=6)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a)[:4], np.asarray(c)[:4])
    assert np.array_equal(np.asarray(a)[4:], np.asarray(im))
    s, m = extend_canvas(im, right=3, fill="color", color=(1, 2, 3))
    assert (np.asarray(s)[:, 8:] == [1, 2, 3]).all() and (np.asarray(m)[:, 8:] == 255).all()
    assert (np.asarray(m)[:, :8] == 0).all()                    # overlap 0: the seam is kept


def test_extend_canvas_refusals():
    im = _rgb(8, 8)
    with pytest.raises(UserInputError, match="left must be an integer >= 0"):
        extend_canvas(im, left=-1)
    with pytest.raises(UserInputError, match="at least one of"):
        extend_canvas(im)
    with pytest.raises(UserInputError, match="leaves nothing"):
        extend_canvas(im, left=4, right=4, overlap=4)
    with pytest.raises(UserInputError, match="three integers"):
        extend_canvas(im, left=4, fill="color", color=(300, 0, 0))
    with pytest.raises(UserInputError, match="unknown outpaint fill"):
        extend_canvas(im, left=4, fill="mirror")


# --- slerp -------------------------------------------------------------------------------------

def test_slerp_endpoints_are_exact():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1), b)
    assert torch.allclose(slerp(a, b, 1e-9), a, atol=1e-6)


def test_slerp_keeps_the_norm_of_gaussians():
    d = 4096
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, d, generator=g), torch.randn(3, d, generator=g)
    for t in (0.25, 0.5, 0.75):
        norms = slerp(a, b, t).norm(dim=1)
        assert ((norms / math.sqrt(d) - 1).abs() < 0.02).all()
    assert ((((1 - 0.5) * a + 0.5 * b).norm(dim=1) / math.sqrt(d)) < 0.8).all()  # lerp shrinks


def test_slerp_formula_and_parallel_fallback():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    t = 1 / 3                                                   # 30 degrees along the arc
    assert torch.allclose(slerp(a, b, t), torch.tensor([[math.cos(math.pi / 6),
                                                         math.sin(math.pi / 6)]]), atol=1e-7)
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([[2.0, 4.0, 6.0], [0.0, 0.0, 1.0]])        # row 0 parallel: lerp
    out = slerp(x, y, 0.5)
    assert torch.allclose(out[0], (x[0] + y[0]) / 2)
    assert torch.allclose(out[1], torch.tensor([1.0, 0.0, 1.0]) / math.sqrt(2))
    assert torch.equal(slerp(torch.zeros(3), torch.ones(3), 0.5), torch.full((3,), 0.5))
    assert slerp(a.half(), b.half(), 0.5).dtype == torch.float16
    with pytest.raises(UserInputError, match="one shape"):
        slerp(a, torch.zeros(1, 3), 0.5)


# --- grids and animations ----------------------------------------------------------------------

def test_image_grid():
    ims = [Image.new("RGB", (4, 3), (10 * i, 0, 0)) for i in range(5)]
    grid = image_grid(ims)                                      # ceil(sqrt(5)) = 3 columns
    assert grid.size == (12, 6)
    g = np.asarray(grid)
    assert g[0, 0, 0] == 0 and g[0, 4, 0] == 10 and g[3, 4, 0] == 40 and (g[3:, 8:] == 0).all()
    assert image_grid(ims, cols=5).size == (20, 3) and image_grid(ims, cols=9).size == (20, 3)
    with pytest.raises(UserInputError, match="one size"):
        image_grid([ims[0], Image.new("RGB", (5, 5))])


@pytest.mark.parametrize("suffix", [".gif", ".webp", ".WEBP"])
def test_save_animation_reopens_with_all_frames(tmp_path, suffix):
    frames = [Image.new("RGB", (16, 16), (40 * i, 255 - 40 * i, 0)) for i in range(5)]
    path = tmp_path / f"walk{suffix}"
    save_animation(frames, path, duration_ms=50)
    with Image.open(path) as im:
        assert im.n_frames == 5 and im.size == (16, 16)
        assert im.format == ("GIF" if suffix == ".gif" else "WEBP")
    assert os.listdir(tmp_path) == [path.name]                  # no temporary left beside it


def test_save_animation_refusals(tmp_path):
    frames = [_rgb(8, 8)]
    with pytest.raises(UserInputError, match=r"must end in \.gif or \.webp"):
        save_animation(frames, tmp_path / "a.png")
    with pytest.raises(UserInputError, match="duration_ms must be an integer >= 1"):
        save_animation(frames, tmp_path / "a.gif", duration_ms=0)
    with pytest.raises(UserInputError, match="non-empty list"):
        save_animation([], tmp_path / "a.gif")
    assert os.listdir(tmp_path) == []


def test_blur_matches_pil_gaussian():
    mask = Image.fromarray(np.random.default_rng(7).integers(0, 256, (16, 16), dtype=np.uint8))
    assert np.array_equal(np.asarray(blur_mask(mask, 1.5)),
                          np.asarray(mask.filter(ImageFilter.GaussianBlur(1.5))))


def test_integer_and_float_images_are_scaled():
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    with pytest.warns(ImageConvertedWarning, match=r"floats in \[0, 1\] scaled"):
        assert np.asarray(load_image(f))[0, :, 0].tolist() == [0, 128, 255]
    i32 = Image.fromarray(np.array([[0, 257 * 3, 65535]], dtype=np.int32))
    with pytest.warns(ImageConvertedWarning, match="read as 16-bit"):
        assert np.asarray(load_mask(i32)).tolist() == [[0, 3, 255]]
