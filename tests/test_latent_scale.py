"""A single file carries the standard latent scale, so readers that assume it decode it right.

The model here has the `tiny` architecture with its own VAE scaling_factor (0.99277, the bundled
model's). Exported as a single file, the ratio to the standard 0.18215 is folded into the VAE's
quant_conv/post_quant_conv (ldm_engine/convert/latent_scale.py). Checked both ways: the folded VAE
encodes to the same diffusion latents and decodes the same latents to the same images; and a
reader that ignores our metadata -- our own inference with --family, and diffusers'
`from_single_file` given a standard-factor config, both as A1111/ComfyUI do -- gets the original
model's images.
"""

import dataclasses
import math

import pytest
import safetensors
import safetensors.torch
import torch
from diffusers import AutoencoderKL

from ldm_engine.components import build_random, load_model, save_model
from ldm_engine.configs import TINY
from ldm_engine.convert import convert, load_state
from ldm_engine.convert.latent_scale import STANDARD_SCALING_FACTOR
from pipelines import TextToImage

OWN = 0.99277
STANDARD = STANDARD_SCALING_FACTOR["clip"]
S = OWN / STANDARD
OWN_SCALE = dataclasses.replace(TINY, vae=dataclasses.replace(TINY.vae, scaling_factor=OWN))
# float32 rounding of one extra multiply in each 1x1 conv, measured at ~2e-7 on latents of size ~1
# and ~1e-5 on pixels in [-1, 1] after the decoder's ~40 layers; bounds with margin.
LATENT_TOL = dict(rtol=1e-5, atol=1e-5)
PIXEL_TOL = dict(rtol=0, atol=5e-5)
QUANT_KEYS = ("quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight")
GEN = dict(num_inference_steps=3, guidance_scale=5.0, height=64, width=64, seed=7, progress=False)


@pytest.fixture(scope="module")
def own_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "own-scale"
    save_model(build_random(OWN_SCALE, seed=0), path)
    return path


@pytest.fixture(scope="module")
def own_file(own_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("files") / "own-scale.safetensors"
    report = convert(own_dir, path)
    assert any("folded the ratio" in n and str(OWN) in n for n in report.notes)
    return path


@pytest.fixture(scope="module")
def own_images(own_dir):
    return _images(own_dir)


def strip_metadata(src, dst):
    """The same tensors without our ldm_engine.* metadata: how another tool sees the file."""
    safetensors.torch.save_file(safetensors.torch.load_file(str(src)), str(dst),
                                metadata={"format": "pt"})
    return dst


def _images(path) -> torch.Tensor:
    return TextToImage.from_folder(path)("a red cube", **GEN).pixels


def _assert_same_latent_space(original: AutoencoderKL, folded: AutoencoderKL) -> None:
    """Diffusion latents c * z and decoded images agree, each VAE with its own factor."""
    c0, c1 = original.config.scaling_factor, folded.config.scaling_factor
    assert (c0, c1) == (OWN, STANDARD)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    x = torch.randn(2, 4, 8, 8, generator=g)                 # latents as the UNet makes them
    with torch.no_grad():
        d0, d1 = original.encode(image).latent_dist, folded.encode(image).latent_dist
        torch.testing.assert_close(d1.mean * c1, d0.mean * c0, **LATENT_TOL)
        torch.testing.assert_close(d1.std * c1, d0.std * c0, **LATENT_TOL)
        torch.testing.assert_close(folded.decode(x / c1).sample, original.decode(x / c0).sample,
                                   **PIXEL_TOL)


def test_the_file_holds_the_standard_factor_and_an_equivalent_vae(own_dir, own_file):
    state = load_state(own_file)
    assert state.vae_config["scaling_factor"] == STANDARD
    _assert_same_latent_space(load_model(own_dir).vae, load_model(own_file).vae)
    # Only the two 1x1 convolutions changed; every other tensor is the source's, bit for bit.
    source = load_state(own_dir)
    for name, weights in state.weights():
        for key, value in weights.items():
            if name == "vae" and key in QUANT_KEYS:
                assert not torch.equal(value, source.vae[key])
            else:
                assert torch.equal(value, getattr(source, name)[key]), key


def test_generation_from_the_file_equals_the_folder(own_file, own_images):
    torch.testing.assert_close(_images(own_file), own_images, **PIXEL_TOL)


def test_readers_that_ignore_our_metadata_decode_right(own_dir, own_file, own_images, tiny_dir,
                                                      tmp_path):
    foreign = strip_metadata(own_file, tmp_path / "foreign.safetensors")
    # Our converter, configs inferred from the shapes (the family's constants, as A1111 does) ...
    report = convert(foreign, tmp_path / "inferred")
    assert report.family == "tiny"
    assert load_model(tmp_path / "inferred").vae.config.scaling_factor == STANDARD
    torch.testing.assert_close(_images(tmp_path / "inferred"), own_images, **PIXEL_TOL)
    # ... --family, which sets our metadata aside ...
    convert(own_file, tmp_path / "forced", family="tiny")
    torch.testing.assert_close(_images(tmp_path / "forced"), own_images, **PIXEL_TOL)
    # ... and diffusers' own single-file loader with a standard-factor config (tiny_dir's).
    theirs = AutoencoderKL.from_single_file(str(foreign), config=str(tiny_dir), subfolder="vae",
                                            local_files_only=True).eval()
    _assert_same_latent_space(load_model(own_dir).vae, theirs)


def test_round_trips(own_file, own_images, tmp_path):
    # folder -> file -> folder is a different but equivalent VAE, so images agree up to rounding;
    convert(own_file, tmp_path / "folder")
    torch.testing.assert_close(_images(tmp_path / "folder"), own_images, **PIXEL_TOL)
    # file -> folder -> file is bit-identical: the folder already has the standard factor.
    report = convert(tmp_path / "folder", tmp_path / "again.safetensors")
    assert not any("folded" in n for n in report.notes)
    first = safetensors.torch.load_file(str(own_file))
    again = safetensors.torch.load_file(str(tmp_path / "again.safetensors"))
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k].view(torch.uint8), again[k].view(torch.uint8)) for k in first)
    with safetensors.safe_open(str(own_file), "pt") as f1, \
            safetensors.safe_open(str(tmp_path / "again.safetensors"), "pt") as f2:
        assert f1.metadata() == f2.metadata()


@pytest.mark.parametrize("source_dtype,cast", [(torch.float16, None), (torch.float32, "fp16")])
def test_fold_is_float64_arithmetic_rounded_once(source_dtype, cast, tmp_path):
    save_model(build_random(OWN_SCALE, seed=0), tmp_path / "src", dtype=source_dtype)
    convert(tmp_path / "src", tmp_path / "out.safetensors", dtype=cast)
    src, out = load_state(tmp_path / "src").vae, load_state(tmp_path / "out.safetensors").vae
    c = 4
    want_w, want_b = src["quant_conv.weight"].double(), src["quant_conv.bias"].double()
    want_w[:c] *= S
    want_b[:c] *= S
    want_b[c:] += 2 * math.log(S)
    want_post = src["post_quant_conv.weight"].double() / S
    for key, want in (("quant_conv.weight", want_w), ("quant_conv.bias", want_b),
                      ("post_quant_conv.weight", want_post)):
        assert out[key].dtype == torch.float16
        assert torch.equal(out[key], want.half()), key


def test_a_standard_factor_is_left_alone(tiny_dir, tmp_path):
    report = convert(tiny_dir, tmp_path / "tiny.safetensors")
    assert not any("folded" in n for n in report.notes)
    state, source = load_state(tmp_path / "tiny.safetensors"), load_state(tiny_dir)
    assert all(torch.equal(state.vae[k], source.vae[k]) for k in QUANT_KEYS)
