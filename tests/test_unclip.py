"""Variations, interpolations and text-diff edits (pipelines.unclip) on the tiny random model."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_engine.errors import UserInputError
from pipelines import Edit, GenerationParams, Interpolate, TextToImage, Vary, save_sequence
from pipelines.images import slerp
from pipelines.inversion import image_x0, invert
from pipelines.params import EditParams, InterpolationParams, VariationParams
from pipelines.pnginfo import InexactRemakeWarning, format_parameters, parse_parameters
from pipelines.unclip import edit_states

STEPS = 3
CAPTION = "a red circle"


@pytest.fixture(scope="module")
def pipes(tiny_components):
    return {cls: cls(tiny_components) for cls in (TextToImage, Vary, Interpolate, Edit)}


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3)).astype("uint8"))


def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 4, 8, 8, generator=g), torch.randn(64, 4, 8, 8, generator=g)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    # At the real latent size (4 x 8 x 8 = 256) a unit Gaussian's norm is ~16; slerp keeps it
    # within 2 % on average over 64 pairs, where lerp would lose 1 - 1/sqrt(2) = 29 % at 0.5.
    norm = a.flatten(1).norm(dim=1).mean()
    for t in (0.25, 0.5, 0.75):
        ratio = float(slerp(a, b, t).flatten(1).norm(dim=1).mean() / norm)
        assert abs(ratio - 1) < 0.02, (t, ratio)
    assert float(((a + b) / 2).flatten(1).norm(dim=1).mean() / norm) < 0.75


@pytest.mark.parametrize("sampler,scale", [("ddim", 7.5), ("euler", 1.0)])
def test_interpolation_ends_are_txt2img(pipes, sampler, scale):
    request = InterpolationParams(prompt=CAPTION, end_prompt="a blue square", seed=5, frames=3,
                                  steps=STEPS, sampler=sampler, guidance_scale=scale)
    frames = pipes[Interpolate].run(request)
    t2i = pipes[TextToImage]
    first = t2i.run(GenerationParams(prompt=CAPTION, seed=5, steps=STEPS, sampler=sampler,
                                     guidance_scale=scale))
    last = t2i.run(GenerationParams(prompt="a blue square", seed=6, steps=STEPS,
                                    sampler=sampler, guidance_scale=scale))
    assert [p.frame for p in frames.params] == [0, 1, 2]
    assert all(p.end_seed == 6 and p.seed == 5 for p in frames.params)
    # The same images up to float32 rounding of a batch of 3 against a batch of 1 (guidance
    # 7.5 makes the random model's latents ~6 in size): 1e-5 in pixels and relative latents.
    for k, alone in ((0, first), (2, last)):
        assert (frames.pixels[k] - alone.pixels[0]).abs().max() <= 1e-5
        size = alone.latents.abs().max()
        assert (frames.latents[k] - alone.latents[0]).abs().max() <= 1e-5 * size
    middle = frames.latents[1]
    assert (middle - first.latents[0]).abs().max() > 1e-3
    assert (middle - last.latents[0]).abs().max() > 1e-3


def test_interpolation_frame_from_its_png_remakes_it(pipes):
    request = InterpolationParams(prompt=CAPTION, seed=2, frames=3, steps=2)
    result = pipes[Interpolate].run(request)
    back = parse_parameters(format_parameters(result.params[1]))
    assert back == result.params[1]
    again = pipes[Interpolate].run(back)
    assert (again.latents[0] - result.latents[1]).abs().max() <= 1e-5


def test_variation_eta_0_is_the_reconstruction(pipes, image):
    result = pipes[Vary](CAPTION, image, eta=0.0, steps=STEPS, seed=0, progress=False)
    inv = invert(pipes[TextToImage], image, CAPTION, steps=STEPS)
    assert (result.latents - inv.reconstruct(pipes[TextToImage])).abs().max() <= 1e-4


def test_variations_differ_by_seed_and_stay_near_the_image(pipes, image):
    """eta 0.6 at strength 0.5: the seeds' fresh noise makes different images, each closer to
    the input's latents (mean absolute distance) than a text-to-image of another seed."""
    vary = pipes[Vary](CAPTION, image, eta=0.6, strength=0.5, steps=4, seed=0,
                       num_images_per_prompt=2, progress=False)
    assert [p.seed for p in vary.params] == [0, 1]
    assert (vary.latents[0] - vary.latents[1]).abs().mean() > 1e-3
    with torch.inference_mode():
        x0 = image_x0(pipes[TextToImage], image, 64, 64)
    other = pipes[TextToImage](CAPTION, num_inference_steps=4, seed=7, progress=False)
    far = float((other.latents - x0).abs().mean())
    for k in range(2):
        assert float((vary.latents[k] - x0).abs().mean()) < far


def test_edit_amount_0_is_the_reconstruction(pipes, image):
    result = pipes[Edit](CAPTION, image, target_prompt="a blue square", amounts=(0.0, 1.0),
                         steps=STEPS, seed=0, progress=False)
    assert [p.amount for p in result.params] == [0.0, 1.0]
    inv = invert(pipes[TextToImage], image, CAPTION, steps=STEPS)
    assert (result.latents[0] - inv.reconstruct(pipes[TextToImage])[0]).abs().max() <= 1e-4
    assert (result.latents[1] - result.latents[0]).abs().max() > 1e-3


def test_edit_states_move_along_the_difference():
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    tgt[:, 0] = src[:, 0]           # a row the captions share (BOS) stays put
    assert torch.equal(edit_states(src, tgt, 0.0), src)
    assert torch.allclose(edit_states(src, tgt, 1.0), tgt, atol=1e-6)
    assert torch.allclose(edit_states(src, tgt, 0.5), (src + tgt) / 2, atol=1e-6)
    assert torch.equal(edit_states(src, tgt, 2.0)[:, 0], src[:, 0])


@pytest.mark.parametrize("request_", [
    VariationParams(prompt="a, b", seed=3, eta=0.25, strength=0.6, height=64, width=64,
                    init_image_hash="0123456789", resize_mode="crop"),
    InterpolationParams(prompt="x", end_prompt="y: z,\nw", seed=1, end_seed=9, frames=5,
                        frame=3, height=64, width=64, guidance_scale=3.0, eta=0.0),
    InterpolationParams(prompt="x", seed=1, end_seed=2, frames=2, frame=0, height=64, width=64, eta=0.0,
                        init_image_hash="0123456789", end_image_hash="abcdef0123"),
    EditParams(prompt="cat", target_prompt="a dog, running", amounts=(0.0, -0.5, 1e-05, 2.0),
               amount=-0.5, seed=4, height=64, width=64, strength=0.8),
], ids=["vary", "interpolate", "interpolate-images", "edit"])  # concrete per-image params
def test_png_round_trip(request_):
    text = format_parameters(request_)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InexactRemakeWarning)
        back = parse_parameters(text)
    assert type(back) is type(request_) and back == request_, text


def test_save_sequence(pipes, tmp_path):
    result = pipes[Interpolate].run(InterpolationParams(prompt=CAPTION, frames=2, steps=1))
    grid, animation = save_sequence(result, tmp_path / "seq.png")
    assert Image.open(grid).size == (128, 64)
    assert animation.suffix == ".gif" and Image.open(animation).n_frames == 2


@pytest.fixture
def trapped(pipes, trap):
    """The pipeline with every network raising if called (conftest.trap)."""
    return trap(pipes[TextToImage])


@pytest.mark.parametrize("make,message", [
    (lambda im: VariationParams(prompt="x"), "needs an init image"),
    (lambda im: VariationParams(prompt="x", init_image=im, sampler="euler"), "must be ddim"),
    (lambda im: VariationParams(prompt="x", init_image=im, init_latents="sample"), "'mode'"),
    (lambda im: VariationParams(prompt="x", init_image=im, eta=-1.0), "eta"),
    (lambda im: InterpolationParams(prompt="x", frames=1), "frames >= 2"),
    (lambda im: InterpolationParams(prompt="x", frames=3, frame=3), "out of range"),
    (lambda im: InterpolationParams(prompt="x", init_image=im, sampler="euler"), "must be ddim"),
    (lambda im: InterpolationParams(prompt="x", end_image_hash="0123456789"), "pass end_image"),
    (lambda im: InterpolationParams(prompt="x", end_prompt="a\rb"), "carriage return"),
    (lambda im: EditParams(prompt="x", init_image=im), "target_prompt"),
    (lambda im: EditParams(prompt="x", init_image=im, target_prompt=" "), "target_prompt"),
    (lambda im: EditParams(prompt="x", init_image=im, target_prompt="y", amounts=()),
     "non-empty"),
    (lambda im: EditParams(prompt="x", init_image=im, target_prompt="y",
                           amounts=(0.5, float("nan"))), "finite"),
    (lambda im: EditParams(prompt="x", target_prompt="y"), "needs an init image"),
    (lambda im: EditParams(prompt="x", init_image=im, target_prompt="y", sampler="dpmpp_2m"),
     "must be ddim"),
])
def test_bad_input_before_compute(trapped, image, make, message):
    with pytest.raises(UserInputError, match=message):
        trapped.run(make(image))


def test_sequences_refuse_num_images(trapped, image):
    with pytest.raises(UserInputError, match="num_images must be 1"):
        trapped.run(InterpolationParams(prompt="x"), num_images=2)
    with pytest.raises(UserInputError, match="num_images must be 1"):
        trapped.run(EditParams(prompt="x", init_image=image, target_prompt="y"), num_images=2)
