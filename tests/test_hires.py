"""The hires fix (A1111's "Hires. fix"): text to image at the base size, then the result upscaled
by `scale` and re-denoised image to image at the large size with `strength` over the last
int(steps * strength) steps of a `steps` plan (pipelines.txt2img.hires_pass)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import pipelines.base
from ldm_engine.components import build_random
from ldm_engine.configs import TINY
from ldm_engine.errors import UserInputError
from ldm_engine.limits import Memory, SizeLimitError, estimate_bytes
from pipelines import GenerationParams, HiresFix, ImageToImageParams, Observer, TextToImage
from pipelines import read_png_params
from pipelines.images import to_tensor
from conftest import Trapped

PROMPT = "a red circle on the left"
BASE = dict(num_inference_steps=4, guidance_scale=7.5, seed=5, progress=False)


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


class Totals(Observer):
    def __init__(self):
        self.steps = []

    def on_step(self, progress):
        self.steps.append((progress.pass_index, progress.step, progress.total, progress.passes))


# --- sizes and steps ---------------------------------------------------------------------------

@pytest.mark.parametrize("upscaler", ["latent", "latent-bicubic", "latent-nearest", "lanczos"])
def test_output_is_scale_times_the_base_size(pipe, upscaler):
    res = pipe(PROMPT, height=64, width=48, hires=HiresFix(scale=1.5, upscaler=upscaler,
                                                          strength=0.5), **BASE)
    # 1.5 x (64, 48) = (96, 72), both multiples of 8 already.
    assert res.images[0].size == (72, 96)
    assert res.pixels.shape == (1, 3, 96, 72)
    assert res.latents.shape == (1, 4, 12, 9)
    # The request still records the base size (what A1111's "Size" field holds).
    assert (res.params[0].height, res.params[0].width) == (64, 48)


def test_large_size_rounds_down_to_the_vae_factor(pipe):
    res = pipe(PROMPT, hires=HiresFix(scale=1.3, strength=0.5), **BASE)
    assert res.images[0].size == (80, 80)          # int(64 * 1.3) = 83 -> 80


@pytest.mark.parametrize("hires_steps,strength,second", [(6, 1.0, 6), (6, 0.5, 3), (0, 1.0, 4),
                                                         (0, 0.6, 2)])
def test_second_pass_runs_the_hires_steps(pipe, unet_calls, hires_steps, strength, second):
    """Pass 2 is a hires.steps plan (0: the base steps) cut to its last int(steps * strength)."""
    seen = Totals()
    pipe(PROMPT, hires=HiresFix(scale=1.5, steps=hires_steps, strength=strength),
         observer=seen, **BASE)
    assert unet_calls == [(8, 8)] * 4 + [(12, 12)] * second
    assert [s for s in seen.steps if s[0] == 0] == [(0, k, 4, 2) for k in range(1, 5)]
    assert [s for s in seen.steps if s[0] == 1] == [(1, k, second, 2)
                                                    for k in range(1, second + 1)]


# --- strength: from the upscaled base to a new image -------------------------------------------

def test_no_second_step_is_the_upscaled_base(pipe):
    """strength 0.1 of 4 steps runs no step of pass 2: its start is the upscaled latents
    themselves (an empty plan's noised start is x0), so the image is their decode."""
    base = pipe(PROMPT, **BASE)
    res = pipe(PROMPT, hires=HiresFix(scale=1.5, strength=0.1), **BASE)
    up = F.interpolate(base.latents, size=(12, 12), mode="bilinear", align_corners=False)
    assert torch.equal(res.pixels, pipe.decode(up))


def test_no_second_step_lanczos_is_the_resized_base_round_trip(pipe):
    """Lanczos decodes, resizes the 8-bit image and encodes again with the image's generator,
    after the first pass's noise draw from it (DDIM eta 0 draws nothing more)."""
    base = pipe(PROMPT, **BASE)
    res = pipe(PROMPT, hires=HiresFix(scale=1.5, strength=0.1, upscaler="lanczos"), **BASE)
    g = torch.Generator("cpu").manual_seed(BASE["seed"])
    torch.randn((1, 4, 8, 8), generator=g)                 # pass 1's starting noise
    resized = base.images[0].resize((96, 96), Image.Resampling.LANCZOS)
    assert torch.equal(res.pixels, pipe.decode(pipe.encode(to_tensor(resized), [g])))


def test_small_strength_stays_close_to_the_upscaled_base(pipe):
    """The distance from the upscaled base grows with the strength (the forward noise weight
    sqrt(1 - alpha_bar) and the steps re-run both grow): small strength, small change."""
    base = pipe(PROMPT, **BASE)
    up = pipe.decode(F.interpolate(base.latents, size=(12, 12), mode="bilinear",
                                   align_corners=False))
    dist = [(pipe(PROMPT, hires=HiresFix(scale=1.5, strength=s), **BASE).pixels - up)
            .abs().mean().item() for s in (0.25, 0.5, 1.0)]
    assert dist[0] < 0.01
    assert dist[0] < dist[1] < dist[2]


# --- PNG ---------------------------------------------------------------------------------------

def test_png_fields_read_back_and_regenerate(pipe, tmp_path):
    hires = HiresFix(scale=1.5, steps=3, upscaler="latent-bicubic", strength=0.55)
    res = pipe(PROMPT, hires=hires, **BASE)
    text = res.params[0].to_png_text()
    for field in ("Hires upscale: 1.5", "Hires steps: 3", "Hires upscaler: Latent (bicubic)",
                  "Denoising strength: 0.55"):
        assert field in text
    [path] = res.save(tmp_path / "hires.png")
    params = read_png_params(path)
    assert type(params) is GenerationParams          # not image to image: it has a hires fix
    assert params.hires == hires
    assert params == res.params[0]
    again = pipe.regenerate(params, progress=False)
    assert torch.equal(again.pixels, res.pixels)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(res.images[0]))


@pytest.mark.parametrize("upscaler", ["latent", "latent-nearest", "lanczos"])
def test_png_upscaler_names_round_trip(upscaler):
    p = GenerationParams(prompt="x", height=64, width=64, hires=HiresFix(upscaler=upscaler))
    back = GenerationParams.from_png_text(p.to_png_text())
    assert back.hires == p.hires
    assert "Hires steps" not in p.to_png_text()       # 0 (the base steps) is not written


# --- bad values, before any compute ------------------------------------------------------------

@pytest.fixture(scope="module")
def trap_pipe():
    return TextToImage(build_random(TINY, seed=1))


@pytest.fixture
def trapped(trap_pipe, trap):
    """The pipeline with every network raising if called (conftest.trap)."""
    return trap(trap_pipe)


@pytest.mark.parametrize("hires,message", [
    (HiresFix(scale=0.5), r"hires scale must be a number in \[1, 8\], got 0.5"),
    (HiresFix(scale=float("nan")), r"hires scale must be a number in \[1, 8\]"),
    (HiresFix(scale=9), r"hires scale must be a number in \[1, 8\]"),
    (HiresFix(strength=0), r"strength \(denoising strength\) must be a number in \(0, 1\]"),
    (HiresFix(strength=1.2), r"must be a number in \(0, 1\]"),
    (HiresFix(upscaler="foo"), "hires upscaler must be one of latent, latent-bicubic"),
    (HiresFix(steps=-1), "hires steps must be a non-negative integer"),
    (HiresFix(steps=2.5), "hires steps must be a non-negative integer"),
    (HiresFix(steps=2000), "hires steps 2000 is more than the model's 1000 training timesteps"),
    (HiresFix(scale=1.0), "hires scale 1.0 leaves 64x64 unchanged"),
    (HiresFix(scale=1.1), "hires scale 1.1 leaves 64x64 unchanged"),   # 70 -> 64
    ("2x", "hires must be a HiresFix, got str"),
])
def test_bad_hires_values_fail_before_compute(trapped, hires, message):
    with pytest.raises(UserInputError, match=message):
        trapped(PROMPT, hires=hires, **BASE)


def test_hires_is_refused_for_image_to_image(trapped):
    image = Image.new("RGB", (64, 64), (100, 150, 200))
    request = ImageToImageParams(prompt="x", init_image=image, hires=HiresFix())
    with pytest.raises(UserInputError, match="the hires fix is a text-to-image option"):
        trapped.run(request)


# --- limits ------------------------------------------------------------------------------------

def test_size_limit_uses_the_large_size(trapped):
    """The tiny model's native side is 64: a 64 px base is within every limit, its 5x hires
    pass (320 x 320, 25 x the native area) is over the 16 x area limit."""
    with pytest.raises(SizeLimitError, match="320x320 is more than 16x"):
        trapped(PROMPT, hires=HiresFix(scale=5), **BASE)
    with pytest.raises(Trapped):                         # allow_large lifts it
        trapped(PROMPT, hires=HiresFix(scale=5), allow_large=True, **BASE)


def test_memory_estimate_uses_the_large_size(trapped, monkeypatch):
    """With room for the 64 px pass but not for the 96 px one, the hires request is refused
    before compute and the plain one goes on to the networks."""
    shape = trapped.components.shape
    need = {side: estimate_bytes(shape, height=side, width=side, num_images=1, guided=True,
                                 dtype_bytes=4, vae_dtype_bytes=4) for side in (64, 96)}
    assert need[64] < need[96]
    room = (need[64] + need[96]) // 2
    monkeypatch.setattr(pipelines.base, "device_memory",
                        lambda device: Memory(available=room, total=10**12, where="RAM"))
    with pytest.raises(SizeLimitError, match="1 image of 96x96 need about"):
        trapped(PROMPT, hires=HiresFix(scale=1.5), **BASE)
    with pytest.raises(Trapped):
        trapped(PROMPT, **BASE)
