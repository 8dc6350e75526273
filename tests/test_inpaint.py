"""Inpainting and outpainting (pipelines/inpaint.py): parity with diffusers'
StableDiffusionInpaintPipeline for 9-channel and 4-channel UNets, the known region, "only
masked", outpainting, input errors before compute, PNG re-plays."""

import dataclasses
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionInpaintPipeline
from PIL import Image

from ldm_engine.components import build_random, save_model
from ldm_engine.configs import TINY
from ldm_engine.errors import UserInputError
from pipelines import Inpaint, InpaintParams, Outpaint, OutpaintParams, TextToImage
from pipelines.images import binarize, blur_mask, extend_canvas, latent_mask, mask_to_tensor
from pipelines.images import to_tensor
from pipelines.pnginfo import format_parameters, parse_parameters
from schedulers import ScheduleConfig

from conftest import load_reference

PROMPT = "a red circle on a blue square"
STEPS = 3


def _image(w=64, h=64, seed=0):
    """A smooth gradient plus noise: structure for the VAE, different in every pixel."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1),
                     (xx + yy) * 127 // max(w + h - 2, 1)], -1)
    noise = np.random.default_rng(seed).integers(-20, 21, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _mask(w=64, h=64, box=(20, 16, 52, 44)):
    m = np.zeros((h, w), np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 255
    return Image.fromarray(m)


def _reference(path):
    return load_reference(StableDiffusionInpaintPipeline, path)


@pytest.fixture(scope="module")
def nine_dir(tmp_path_factory):
    """A tiny random 9-channel inpainting model. Its schedule is trailing-spaced: diffusers'
    Euler starts a leading-spaced plan from pure noise at sqrt(sigma_0^2 + 1) z where this
    engine (k-diffusion's rule) starts at sigma_0 z; with trailing spacing both start at
    sigma_0 z, so strength 1 can be compared with Euler too."""
    family = dataclasses.replace(
        TINY, unet=dataclasses.replace(TINY.unet, in_channels=9),
        schedule=ScheduleConfig(timestep_spacing="trailing", steps_offset=0))
    path = tmp_path_factory.mktemp("models") / "tiny-inpaint"
    save_model(build_random(family, seed=0), path)
    return path


@pytest.fixture(scope="module")
def nine(nine_dir):
    return Inpaint.from_folder(nine_dir)


@pytest.fixture(scope="module")
def nine_ref(nine_dir):
    return _reference(nine_dir)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return Inpaint.from_folder(tiny_dir)


@pytest.fixture(scope="module")
def ref(tiny_dir):
    return _reference(tiny_dir)


def _theirs(ref, scheduler_cls, seeds, image, mask, **kw):
    """diffusers, one call per seed. (In one batched call diffusers encodes the single init
    image with the first generator only and repeats it, so its image j is not the image of seed
    j alone; this engine keeps A1111's rule that it is, so we compare with single calls.)"""
    ref.scheduler = scheduler_cls.from_config(ref.scheduler.config)
    return torch.cat([ref(PROMPT, image=image, mask_image=mask, num_inference_steps=STEPS,
                          generator=[torch.Generator().manual_seed(s)], output_type="pt",
                          **kw).images for s in seeds])


# --- parity ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler,scheduler_cls", [("ddim", DDIMScheduler),
                                                   ("euler", EulerDiscreteScheduler)])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_nine_channel_parity_with_diffusers(nine, nine_ref, sampler, scheduler_cls, strength):
    # Two images (a batch) in one case, to keep the file fast; one in the others.
    n = 2 if (sampler, strength) == ("ddim", 0.6) else 1
    image, mask = _image(), _mask()
    ours = nine(PROMPT, image, mask, sampler=sampler, steps=STEPS, strength=strength,
                mask_blur=0, seed=11, num_images_per_prompt=n, progress=False)
    theirs = _theirs(nine_ref, scheduler_cls, [11, 12][:n], image, mask, strength=strength)
    assert ours.pixels.shape == theirs.shape == (n, 3, 64, 64)
    assert ours.pixels.std() > 0.02                  # structured output: not vacuous
    assert (ours.pixels - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("strength,eta", [(1.0, 0.0), (0.6, 0.0), (0.6, 0.8)])
def test_four_channel_blend_parity_with_diffusers(pipe, ref, strength, eta):
    """The known region re-imposed after every step, as diffusers does for a 4-channel UNet.
    With eta > 0 DDIM draws step noise after diffusers' (discarded) masked-image encode: the
    match shows the generators advance alike."""
    n = 2 if eta else 1
    image, mask = _image(seed=1), _mask(box=(8, 24, 40, 64))
    ours = pipe(PROMPT, image, mask, sampler="ddim", eta=eta, steps=STEPS, strength=strength,
                mask_blur=0, seed=5, num_images_per_prompt=n, progress=False)
    theirs = _theirs(ref, DDIMScheduler, [5, 6][:n], image, mask, strength=strength, eta=eta)
    if n == 2:
        assert (ours.pixels[0] - ours.pixels[1]).abs().max() > 0.05   # seeds matter
    assert ours.pixels.std() > 0.02
    assert (ours.pixels - theirs).abs().max() <= 1e-4


def test_four_channel_euler_strength_one_differs_by_design(pipe, ref):
    """SD-1.x's leading spacing: diffusers' Euler starts pure noise at sqrt(sigma_0^2 + 1) z,
    this engine at sigma_0 z (k-diffusion, A1111; schedulers.contract.SigmaPlan). Strength < 1
    noises x0 to x0 + sigma z in both, so there they agree."""
    image, mask = _image(), _mask()
    kw = dict(mask_blur=0, seed=2, progress=False, sampler="euler", steps=STEPS)
    ours_full = pipe(PROMPT, image, mask, strength=1.0, **kw)
    ours_part = pipe(PROMPT, image, mask, strength=0.6, **kw)
    full = _theirs(ref, EulerDiscreteScheduler, [2], image, mask, strength=1.0)
    part = _theirs(ref, EulerDiscreteScheduler, [2], image, mask, strength=0.6)
    assert (ours_part.pixels - part).abs().max() <= 1e-4
    assert (ours_full.pixels - full).abs().max() > 1e-3


# --- properties --------------------------------------------------------------------------------

def test_known_region_ends_at_the_image_latents(pipe):
    """After the last step the kept latents are exactly x0 = E(image) (its posterior mean with
    init_latents="mode"), so the unmasked region is the VAE round trip D(E(image)) wherever the
    decoder reads only kept latents. Stated at latent resolution, where it is exact: the tiny
    random VAE has mid-block attention, so each of its pixels reads every latent and no pixel
    of a 64 px image is "away from the mask edge" (its round trip differs by ~0.5 everywhere)."""
    image, mask = _image(seed=3), _mask()
    result = pipe(PROMPT, image, mask, steps=3, seed=1, init_latents="mode", mask_blur=0,
                  progress=False)
    x0 = pipe.encode(to_tensor(image))
    keep = 1 - latent_mask(binarize(mask_to_tensor(mask)), 8)
    assert keep.sum() > 0 and (1 - keep).sum() > 0
    assert torch.equal(result.latents * keep, x0 * keep)
    assert ((result.latents - x0) * (1 - keep)).abs().max() > 0.1   # the hole was repainted
    # and the pixels are those latents decoded
    assert (result.pixels - pipe.decode(result.latents)).abs().max() <= 1e-6


def test_image_and_mask_may_be_paths(pipe, tmp_path):
    image, mask = _image(seed=2), _mask()
    image.save(tmp_path / "image.png")
    mask.convert("RGB").save(tmp_path / "mask.png")      # a gray RGB mask reads as "L"
    kw = dict(steps=1, seed=4, progress=False)
    from_files = pipe(PROMPT, tmp_path / "image.png", str(tmp_path / "mask.png"), **kw)
    assert torch.equal(from_files.latents, pipe(PROMPT, image, mask, **kw).latents)


def test_txt2img_on_a_nine_channel_unet(nine_dir):
    result = TextToImage.from_folder(nine_dir)(PROMPT, num_inference_steps=2, height=64,
                                               width=48, seed=0, progress=False)
    assert result.pixels.shape == (1, 3, 64, 48)
    assert result.images[0].size == (48, 64)
    assert torch.isfinite(result.pixels).all() and result.pixels.std() > 0.01


def test_only_masked_pastes_back_into_the_original(pipe):
    """The crop around the mask is generated at 64x64 and pasted back: the result has the
    original's size, and every pixel the blurred mask leaves at 0 is the original's exactly."""
    image, mask = _image(96, 80, seed=4), _mask(96, 80, box=(60, 10, 76, 26))
    result = pipe(PROMPT, image, mask, steps=2, seed=3, only_masked=True, padding=4,
                  mask_blur=2, height=64, width=64, progress=False)
    assert result.pixels.shape == (1, 3, 80, 96)
    assert result.images[0].size == (96, 80)
    assert result.latents.shape[-2:] == (8, 8)                    # the crop's
    out, src = np.asarray(result.images[0]), np.asarray(image)
    untouched = np.asarray(blur_mask(mask, 2)) == 0
    assert untouched.mean() > 0.8
    assert (out[untouched] == src[untouched]).all()
    assert np.abs(out[~untouched].astype(int) - src[~untouched]).max() > 10


def test_outpaint_size_and_kept_region(pipe):
    """The output is the canvas's size; the kept part of each image's own canvas ("noise" fill:
    seeded by each image's seed) ends at that canvas's latents exactly (see above)."""
    image = _image(64, 48, seed=5)
    result = Outpaint.from_folder(pipe.source)(
        PROMPT, image, bottom=16, fill="noise", steps=2, seed=7, init_latents="mode",
        num_images_per_prompt=2, progress=False)
    assert result.pixels.shape == (2, 3, 64, 64)
    for j in range(2):
        canvas, mask = extend_canvas(image, bottom=16, fill="noise", seed=7 + j, overlap=8)
        x0 = pipe.encode(to_tensor(canvas))
        keep = 1 - latent_mask(binarize(mask_to_tensor(blur_mask(mask, 4))), 8)
        assert keep.sum() >= 8 * 4
        assert torch.equal(result.latents[j:j + 1] * keep, x0 * keep)
    assert result.params[0].seed == 7 and result.params[1].seed == 8


def test_outpaint_canvas_fitted_to_a_given_size(pipe):
    """A canvas that is not a multiple of 8 is fine when the user gives the size."""
    result = Outpaint.from_folder(pipe.source)(PROMPT, _image(64, 60), bottom=2, height=64,
                                               steps=1, seed=0, progress=False)
    assert result.pixels.shape == (1, 3, 64, 64)


# --- errors before compute ---------------------------------------------------------------------

@pytest.fixture
def trapped(pipe, trap):
    """The pipeline with every network raising if called (conftest.trap)."""
    return trap(pipe)


def _dot_mask():
    m = np.zeros((64, 64), np.uint8)
    m[3, 3] = 255                       # not the top-left pixel of its 8x8 block
    return Image.fromarray(m)


ERRORS = [
    (InpaintParams(prompt="x", init_image=_image(), mask=_mask(32, 32)), "must be the same size"),
    (InpaintParams(prompt="x", init_image=_image(), mask=_mask(box=(0, 0, 0, 0))),
     "the mask is empty"),
    (InpaintParams(prompt="x", init_image=_image(), mask=_dot_mask(), mask_blur=0),
     "covers no latent"),
    (InpaintParams(prompt="x", init_image=_image(), mask=_mask(box=(0, 0, 0, 0)),
                   only_masked=True), "the mask is empty"),
    (InpaintParams(prompt="x", mask=_mask()), "inpainting needs an init image"),
    (InpaintParams(prompt="x", init_image=_image()), "inpainting needs a mask"),
    (InpaintParams(prompt="x", init_image_hash="0123456789", mask_hash="9876543210"),
     "records only its hash, 0123456789"),
    (InpaintParams(prompt="x", init_image=_image(), mask_hash="9876543210"),
     "records only its hash, 9876543210"),
    (OutpaintParams(prompt="x", init_image=_image()), "at least one of left/right/top/bottom"),
    (OutpaintParams(prompt="x", init_image=_image(), right=5),
     "width is 69 (64 + left 0 + right 5), not a multiple of the VAE factor 8: add 3"),
    (OutpaintParams(prompt="x", init_image=_image(), top=4, bottom=2), "e.g. bottom=4"),
]


@pytest.mark.parametrize("request_,message", ERRORS)
def test_bad_input_fails_before_any_compute(trapped, request_, message):
    with pytest.raises(UserInputError, match=re.escape(message)):
        trapped.run(request_, progress=False)


# --- PNG re-play -------------------------------------------------------------------------------

def test_png_round_trip_and_regenerate(pipe):
    image, mask = _image(seed=6), _mask()
    result = pipe(PROMPT, image, mask, steps=2, seed=9, strength=0.75, mask_blur=3,
                  only_masked=True, padding=8, progress=False)
    made = result.params[0]
    back = parse_parameters(format_parameters(made))
    assert type(back) is InpaintParams and back == made
    assert back.init_image is None and back.mask_hash == made.mask_hash != ""
    with pytest.raises(UserInputError, match=f"hash, {made.init_image_hash}"):
        pipe.regenerate(back, progress=False)
    again = pipe.regenerate(back.replace(init_image=image, mask=mask), progress=False)
    assert torch.equal(again.latents, result.latents)
    assert torch.equal(again.pixels, result.pixels)


def test_overlay_keeps_the_input_pixels_outside_the_mask(pipe):
    """overlay=True (A1111's): after decoding, the input's own pixels where the blurred mask is
    0, the decoded ones where it is 1, blended in between; without it every pixel is decoded."""
    image, mask = _image(seed=4), _mask()
    plain = pipe(PROMPT, image, mask, steps=2, seed=2, mask_blur=2, progress=False)
    over = pipe(PROMPT, image, mask, steps=2, seed=2, mask_blur=2, overlay=True, progress=False)
    alpha = mask_to_tensor(blur_mask(mask, 2))[0, 0]
    source = to_tensor(image)[0].add(1).div(2)
    keep, repaint = alpha == 0, alpha == 1
    assert keep.sum() > 0 and repaint.sum() > 0
    assert (over.pixels[0][:, keep] - source[:, keep]).abs().max() <= 1e-6
    assert (plain.pixels[0][:, keep] - source[:, keep]).abs().max() > 0.05
    assert torch.equal(over.pixels[0][:, repaint], plain.pixels[0][:, repaint])
    assert torch.equal(over.latents, plain.latents)
    assert parse_parameters(format_parameters(over.params[0])).overlay is True


def test_a_batch_may_give_each_image_its_own_image_and_mask(pipe):
    """A batch of requests differing in image and mask equals each request run alone."""
    requests = [InpaintParams(prompt=PROMPT, init_image=_image(seed=s), mask=_mask(box=box),
                              steps=2, seed=s)
                for s, box in ((5, (0, 0, 32, 32)), (6, (24, 24, 64, 64)))]
    together = pipe.run(requests)
    for k, r in enumerate(requests):
        alone = pipe.run(r)
        assert (together.pixels[k] - alone.pixels[0]).abs().max() <= 1e-5
    with pytest.raises(UserInputError, match="mask is empty"):
        pipe.run([requests[0], requests[1].replace(mask=Image.new("L", (64, 64), 0))])
