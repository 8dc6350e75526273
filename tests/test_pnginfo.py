"""PNG metadata: A1111's `parameters` format written and read back exactly, strictly, safely."""

import hashlib
import json
import random
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ldm_engine import modelhash
from ldm_engine.apps.cli import main
from ldm_engine.components import TEXT_WEIGHTS, UNET_WEIGHTS, VAE_WEIGHTS
from ldm_engine.errors import UserInputError
from pipelines import (GenerationParams, HiresFix, InexactRemakeWarning, TextToImage,
                       read_png_params)
from pipelines.pnginfo import (escape_prompt, format_parameters, parse_parameters, save_png,
                               unescape_prompt)

# --- round trips ---------------------------------------------------------------------------

HOSTILE = [
    "",
    "a red circle",
    "line one\nline two: with, commas",
    "a cat\nNegative prompt: a dog",                    # read back split before the fix
    "Negative prompt: at the start",
    "mid-line Negative prompt: here",
    "already escaped Negative prompt\\: and \\\\: twice Negative prompt\\\\:",
    "a cat\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64",   # settings-like
    "Steps: 5, Sampler: Euler a, CFG scale: 3, Seed: 9, Size: 8x8, Model hash: 0123456789",
    "Steps\\: pre-escaped\nSteps:",
    'quotes "like this", colons: a: b, commas,,, and {braces}',
    "unicode: 猫 🐈 ünïcødé \u200b zero-width, RTL \u05e9\u05dc\u05d5\u05dd, é (latin-1)",
    "  leading and trailing blanks  ",
    "\n\nblank lines\n\n",
    "\ttabs\tand \\ back\\slashes \\",
    "Negative prompt:",
    "Negative prompt:\n",
]


def _params(**kw) -> GenerationParams:
    base = dict(prompt="p", negative_prompt="", steps=12, guidance_scale=6.5, sampler="ddim",
                eta=0.0, height=64, width=32, seed=7, model="tiny", model_hash="0123456789")
    return GenerationParams(**(base | kw))


@pytest.mark.parametrize("prompt", HOSTILE)
@pytest.mark.parametrize("negative", ["", "blurry, low quality",
                                      "first\nNegative prompt: second\nSteps: 3, Seed: 4, Size: 1x1"])
def test_hostile_prompts_round_trip_exactly(prompt, negative):
    p = _params(prompt=prompt, negative_prompt=negative)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # and no field goes unrecognised
        assert parse_parameters(format_parameters(p)) == p


def test_hostile_prompts_round_trip_through_png_files(tmp_path):
    image = Image.new("RGB", (8, 8))
    for k, prompt in enumerate(HOSTILE):
        p = _params(prompt=prompt, negative_prompt=HOSTILE[-1 - k], model='odd, "name": x\n',
                    seed=2**64 - 1, eta=0.25, guidance_scale=1e-05)
        path = tmp_path / f"{k}.png"
        save_png(image, path, p)
        assert read_png_params(path) == p


def test_escaping_is_one_to_one_and_leaves_no_marker():
    """Random strings over the characters that matter: unescape(escape(s)) == s, and the escaped
    text has no `Negative prompt:` anywhere and no line starting with `Steps:`."""
    pieces = ["Negative prompt", "Steps", "\\", ":", "\n", " ", "x", "Negative prompt\\:"]
    rng = random.Random(0)
    for _ in range(3000):
        s = "".join(rng.choice(pieces) for _ in range(rng.randrange(12)))
        e = escape_prompt(s)
        assert unescape_prompt(e) == s
        assert "Negative prompt:" not in e
        assert not any(line.startswith("Steps:") for line in e.split("\n"))


# --- the A1111 format ----------------------------------------------------------------------

def test_settings_line_is_a1111s():
    text = format_parameters(_params(prompt="x"))
    assert text == ("x\nSteps: 12, Sampler: DDIM, CFG scale: 6.5, Seed: 7, Size: 32x64, "
                    "Model hash: 0123456789, Model: tiny, Version: ldm-engine 0.1.0")
    # `Eta` alone is A1111's ancestral eta; DDIM's is `Eta DDIM`, written only when not 0.
    last = format_parameters(_params(eta=0.5, sampler="ddpm")).split("\n")[-1]
    assert "Sampler: DDPM" in last and "Eta DDIM: 0.5" in last and "Eta:" not in last


def test_pixel_settings_are_written_only_when_not_the_default():
    last = format_parameters(_params(dtype="bf16", deep_cache=3, vae_tiling=True))
    assert last.endswith("Dtype: bf16, Deep cache: 3, VAE tiling: True, Version: ldm-engine 0.1.0")
    exact = format_parameters(_params())
    assert "Dtype" not in exact and "Deep cache" not in exact and "VAE tiling" not in exact


@pytest.mark.parametrize("name", ["DDIM", "ddim", "Ddim"])
def test_sampler_display_names_read_in_any_case(name):
    p = parse_parameters(f"x\nSteps: 3, Sampler: {name}, CFG scale: 7, Seed: 1, Size: 8x8")
    assert p.sampler == "ddim" and p.guidance_scale == 7.0 and p.eta == 0.0


def test_values_are_quoted_as_a1111_quotes_them():
    last = format_parameters(_params(model='my, "best": model')).split("\n")[-1]
    assert 'Model: "my, \\"best\\": model"' in last
    assert parse_parameters(format_parameters(_params(model='my, "best": model'))).model == \
        'my, "best": model'


A1111_TEXT = (
    "masterpiece, a castle on a hill, (detailed:1.2)\n"
    "Negative prompt: lowres, bad anatomy\n"
    "Steps: 2, Sampler: DDIM, Schedule type: Automatic, CFG scale: 7, Seed: 1234, Size: 64x64, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, Clip skip: 2, "
    'Hires upscale: 2, Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54", '
    "Eta: 0.67, Version: v1.10.1")
NOT_HONOURED = ["Lora hashes", "Eta"]


def test_a1111_fields_we_cannot_honour_are_named_in_a_warning():
    with pytest.warns(InexactRemakeWarning) as record:
        p = parse_parameters(A1111_TEXT)
    [w] = record
    assert str(w.message).endswith(": " + ", ".join(NOT_HONOURED))
    assert (p.prompt, p.negative_prompt) == ("masterpiece, a castle on a hill, (detailed:1.2)",
                                             "lowres, bad anatomy")
    assert (p.steps, p.sampler, p.guidance_scale, p.seed, p.width, p.height) == \
        (2, "ddim", 7.0, 1234, 64, 64)
    assert (p.model, p.model_hash, p.eta, p.dtype, p.deep_cache, p.clip_skip) == \
        ("v1-5-pruned-emaonly", "6ce0161689", 0.0, "fp32", 1, 2)
    # The hires fix is honoured: A1111's upscale, upscaler and second-pass strength.
    assert p.hires == HiresFix(scale=2.0, upscaler="latent", steps=0, strength=0.7)


def test_old_eight_digit_model_hash_and_civitai_hashes_are_read():
    with pytest.warns(InexactRemakeWarning, match="Hashes"):
        p = parse_parameters('x\nSteps: 3, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 8x8, '
                             'Model hash: 7460a6fa, Hashes: {"model": "7460a6fa", "vae": "c6a5"}')
    assert p.model_hash == "7460a6fa"


# --- strictness ----------------------------------------------------------------------------

GOOD = "x\nSteps: 3, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 8x8"


@pytest.mark.parametrize("text, message", [
    ("just a prompt", "settings line"),
    ("", "settings line"),
    (GOOD.replace("Steps: 3", "Steps: 4_0"), "ASCII digits"),
    (GOOD.replace("Steps: 3", "Steps: \u0664\u0660"), "ASCII digits"),     # Arabic-Indic 40
    (GOOD.replace("Steps: 3", "Steps: +3"), "ASCII digits"),
    (GOOD.replace("Steps: 3", "Steps: 03"), "ASCII digits"),
    (GOOD.replace("Steps: 3", "Steps: 0"), "Steps must be >= 1"),
    (GOOD.replace("Steps: 3", "Steps: 3 "), "malformed settings"),
    (GOOD.replace("Steps: 3", "Steps:  3"), "malformed settings"),
    (GOOD.replace("Steps: 3", "Steps: " + "9" * 21), "at most 20"),
    (GOOD.replace("Steps: 3", "Steps: " + "9" * 5001), "at most 20"),
    (GOOD.replace("Seed: 1", "Seed: 18446744073709551616"), "Seed must be between 0 and"),
    (GOOD.replace("Seed: 1", "Seed: 99999999999999999999"), "Seed must be between 0 and"),
    (GOOD.replace("Seed: 1", "Seed: -1"), "ASCII digits"),
    (GOOD.replace("8x8", "100000x100000"), "decompression-bomb"),
    (GOOD.replace("8x8", "1000000x1"), "WIDTHxHEIGHT"),
    (GOOD.replace("8x8", "0x8"), "WIDTHxHEIGHT"),
    (GOOD.replace("8x8", "8x8x8"), "WIDTHxHEIGHT"),
    (GOOD.replace("CFG scale: 7", "CFG scale: nan"), "finite decimal"),
    (GOOD.replace("CFG scale: 7", "CFG scale: inf"), "finite decimal"),
    (GOOD.replace("CFG scale: 7", "CFG scale: 1e999"), "finite decimal"),
    (GOOD.replace("CFG scale: 7", "CFG scale: 7,5"), "malformed settings"),
    (GOOD + ", Eta DDIM: -1.0", "Eta DDIM must be >= 0"),
    (GOOD + ", Deep cache: 0", "Deep cache must be >= 1"),
    (GOOD + ", Dtype: fp8", "Dtype must be one of"),
    (GOOD + ", VAE tiling: yes", "VAE tiling must be one of"),
    (GOOD + ", Model hash: XYZ", "Model hash"),
    (GOOD + ', Model: "bad \\x escape"', "not a valid quoted string"),
    (GOOD + ', Model: "unterminated', "malformed settings"),
    (GOOD + ", Steps: 4", "'Steps' twice"),
    (GOOD + ",", "malformed settings"),
    (GOOD + ", ", "ends with a comma"),
    (GOOD.replace(", Seed: 1", ""), "lack Seed"),
    (GOOD.replace("\n", "\r\n"), "carriage return"),
    (GOOD.replace("x\n", "x\r\n"), "carriage return"),
    (GOOD.replace("x", "x\0y"), "NUL"),
    ("a\nNegative prompt: b\nNegative prompt: c\n" + GOOD.split("\n")[1], "there can be one"),
    ("x" * (1 << 20) + "\n" + GOOD.split("\n")[1], "over the"),
])
def test_strict_parser_refuses_with_one_line(text, message):
    with pytest.raises(UserInputError, match=message) as e:
        parse_parameters(text)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


# --- PNG files -----------------------------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, *text_chunks: bytes) -> bytes:
    """A PNG written by hand: an 8-bit grey header claiming width x height, then text chunks,
    then image data for a single row (enough for PIL to open it, never to decode it)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + b"".join(text_chunks)
            + _chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + _chunk(b"IEND", b""))


def _text(value: str) -> bytes:
    return _chunk(b"tEXt", b"parameters\0" + value.encode("latin-1"))


@pytest.mark.parametrize("name, data, message", [
    ("bomb.png", _png(100_000, 100_000, _text(GOOD)), "decompression bomb"),
    ("ztxt.png", _png(8, 8, _chunk(b"zTXt", b"parameters\0\0" + zlib.compress(b"x" * (2 << 20)))),
     "MAX_TEXT_CHUNK"),
    ("big.png", _png(8, 8, _text("x" * (2 << 20) + GOOD)), "over the"),
    ("none.png", _png(8, 8), "no generation parameters"),
    ("jpeg.png", b"\xff\xd8\xff\xe0" + b"\0" * 64, "cannot read the PNG"),
    ("empty.png", b"", "cannot read the PNG"),
    ("crc.png", _png(8, 8, _text(GOOD))[:-20] + b"garbage" + b"\0" * 13, None),
])
def test_bad_png_files_are_one_line_errors(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    if message is None:                      # a broken tail is not read at all: still fine
        assert read_png_params(path).steps == 3
        return
    with pytest.raises(UserInputError, match=message) as e:
        read_png_params(path)
    assert "\n" not in str(e.value)


def test_missing_png_is_a_one_line_error(tmp_path):
    with pytest.raises(UserInputError, match="image not found"):
        read_png_params(tmp_path / "nope.png")


def test_reading_never_decodes_the_pixels(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    save_png(Image.new("RGB", (8, 8)), path, _params())

    def never(self):
        raise AssertionError("pixels decoded to read metadata")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", never)
    assert read_png_params(path) == _params()


def test_sd_parsers_reads_our_png_as_a1111(tmp_path):
    from sd_parsers import ParserManager
    from sd_parsers.data import Generators

    p = _params(prompt="a cat, on a mat\nNegative prompt: a dog\nSteps: 1, Seed: 2, Size: 3x3",
                negative_prompt="blurry, low quality", eta=0.3, dtype="bf16", deep_cache=3)
    path = tmp_path / "a.png"
    save_png(Image.new("RGB", (8, 8)), path, p)
    info = ParserManager().parse(path)
    assert info.generator == Generators.AUTOMATIC1111
    [sampler] = info.samplers
    assert sampler.name == "DDIM"
    assert sampler.parameters == {"steps": "12", "cfg_scale": "6.5", "seed": "7"}
    assert (sampler.model.name, sampler.model.hash) == ("tiny", "0123456789")
    # Not split at the prompt's own "Negative prompt:" (sd-parsers splits at every one).
    assert [str(x) for x in sampler.prompts] == [escape_prompt(p.prompt)]
    assert [str(x) for x in sampler.negative_prompts] == ["blurry, low quality"]
    assert info.metadata == {"Size": "32x64", "Eta DDIM": "0.3", "Dtype": "bf16",
                             "Deep cache": "3", "Version": "ldm-engine 0.1.0"}


# --- the model hash ------------------------------------------------------------------------

def test_folder_hash_is_the_documented_sha256(tiny_dir, tmp_path):
    joined = b"".join((tiny_dir / rel).read_bytes()
                      for rel in (UNET_WEIGHTS, VAE_WEIGHTS, TEXT_WEIGHTS))
    assert modelhash.model_hash(tiny_dir) == hashlib.sha256(joined).hexdigest()[:10]
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"not really a model")
    assert modelhash.model_hash(single) == hashlib.sha256(b"not really a model").hexdigest()[:10]


def test_a_single_file_pipeline_records_a1111s_hash_of_the_file(tiny_dir, tmp_path):
    from ldm_engine.convert import convert

    single = tmp_path / "tiny.safetensors"
    convert(tiny_dir, single)
    res = TextToImage.from_folder(single)("x", num_inference_steps=1, seed=0, progress=False)
    assert res.params[0].model_hash == hashlib.sha256(single.read_bytes()).hexdigest()[:10]
    assert res.params[0].model == "tiny"


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return TextToImage.from_folder(tiny_dir)


def test_pipeline_hashes_its_model_once_and_lazily(tiny_dir, monkeypatch):
    calls = []
    real = modelhash.model_sha256
    monkeypatch.setattr(modelhash, "model_sha256", lambda p: calls.append(p) or real(p))
    fresh = TextToImage.from_folder(tiny_dir)
    assert calls == []                                      # not at load time
    for seed in (1, 2):
        res = fresh("x", num_inference_steps=1, seed=seed, progress=False)
        assert res.params[0].model_hash == modelhash.model_hash(tiny_dir)
    assert len(calls) == 1 + 2                              # once by the pipeline, twice here


def test_carriage_return_prompt_is_refused_before_compute(pipe, monkeypatch):
    def never(*a, **k):
        raise AssertionError("a network ran before input validation")

    monkeypatch.setattr(pipe.components.text_encoder, "forward", never)
    with pytest.raises(UserInputError, match="carriage return"):
        pipe("a\r\nb", num_inference_steps=1, progress=False)
    with pytest.raises(UserInputError, match="negative prompt contains a NUL"):
        pipe("a", negative_prompt="b\0", num_inference_steps=1, progress=False)


def test_text_the_format_cannot_hold_is_never_written():
    for bad in ("a\rb", "a\0b", "a\ud800b"):
        with pytest.raises(UserInputError, match="prompt"):
            format_parameters(_params(negative_prompt=bad))


def test_regenerate_names_what_differs(pipe):
    made = pipe("x", num_inference_steps=2, seed=3, height=32, width=32, progress=False)
    wanted = made.params[0].replace(model_hash="ffffffffff", deep_cache=3)
    with pytest.warns(InexactRemakeWarning, match="model hash .*; deep_cache 1, the image's is 3"):
        again = pipe.regenerate(wanted, progress=False)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(made.images[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.regenerate(made.params[0], progress=False)


@pytest.mark.parametrize("change, message", [
    (GOOD.replace("Steps: 3", "Steps: 1001"), "steps"),            # over the training timesteps
    (GOOD.replace("8x8", "4096x4096"), "4096"),                    # hung generating for hours
])
def test_png_values_beyond_the_model_are_refused_before_compute(pipe, monkeypatch, change,
                                                                message):
    def never(*a, **k):
        raise AssertionError("a network ran before input validation")

    monkeypatch.setattr(pipe.components.text_encoder, "forward", never)
    monkeypatch.setattr(pipe.components.unet, "forward", never)
    with pytest.raises(UserInputError, match=message):
        pipe.regenerate(parse_parameters(change), progress=False)


# --- the CLI -------------------------------------------------------------------------------

def test_cli_remakes_a_deep_cache_bf16_image_identically(tiny_dir, tmp_path, capsys):
    """Before the fix, --from-image dropped --deep-cache 3 (and used --dtype auto)."""
    a, b, c = (tmp_path / n for n in ("a.png", "b.png", "c.png"))
    assert main(["generate", "a red circle", "--model", str(tiny_dir), "--out", str(a),
                 "--steps", "6", "--seed", "1", "--deep-cache", "3", "--dtype", "bf16",
                 "--quiet"]) == 0
    made = read_png_params(a)
    assert (made.deep_cache, made.dtype, made.vae_tiling) == (3, "bf16", False)
    assert made.model_hash == modelhash.model_hash(tiny_dir)
    assert main(["generate", "--from-image", str(a), "--model", str(tiny_dir), "--out", str(b),
                 "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert read_png_params(b) == made
    # The command line still overrides, and the new PNG says what was used.
    assert main(["generate", "--from-image", str(a), "--model", str(tiny_dir), "--out", str(c),
                 "--deep-cache", "1", "--dtype", "fp32", "--quiet"]) == 0
    assert read_png_params(c) == made.replace(deep_cache=1, dtype="fp32")
    assert capsys.readouterr().err == ""


def test_cli_names_a1111_fields_it_cannot_honour_one_line_each(tiny_dir, tmp_path, capsys):
    src, out = tmp_path / "a1111.png", tmp_path / "out.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_TEXT)
    Image.new("RGB", (64, 64)).save(src, pnginfo=info)
    assert main(["generate", "--from-image", str(src), "--model", str(tiny_dir), "--out",
                 str(out), "--quiet"]) == 0
    lines = capsys.readouterr().err.strip().split("\n")
    assert len(lines) == 2 and all(line.startswith("ldm generate: warning: ") for line in lines)
    assert lines[0].endswith(", ".join(NOT_HONOURED))
    assert "model hash" in lines[1] and "6ce0161689" in lines[1]
    assert read_png_params(out).seed == 1234
    assert read_png_params(out).clip_skip == 2         # A1111's Clip skip is honoured


def test_cli_other_samplers_are_refused_unless_overridden(tiny_dir, tmp_path, capsys):
    src, out = tmp_path / "euler.png", tmp_path / "out.png"
    src.write_bytes(_png(8, 8, _text(GOOD.replace("DDIM", "DPM fast"))))
    argv = ["generate", "--from-image", str(src), "--model", str(tiny_dir), "--out", str(out),
            "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown sampler 'DPM fast'; valid samplers: ddim (DDIM), " in err and not out.exists()
    assert main(argv + ["--sampler", "ddim"]) == 0
    assert read_png_params(out).sampler == "ddim"


@pytest.mark.parametrize("data", [_png(8, 8, _text(GOOD.replace("Steps: 3", "Steps: 4_0"))),
                                  _png(100_000, 100_000, _text(GOOD)),
                                  _png(8, 8, _text(GOOD.replace("8x8", "100000x100000")))])
def test_cli_bad_png_is_exit_2_and_one_line(tiny_dir, tmp_path, capsys, data):
    src, out = tmp_path / "bad.png", tmp_path / "out.png"
    src.write_bytes(data)
    assert main(["generate", "--from-image", str(src), "--model", str(tiny_dir), "--out",
                 str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldm generate: error: ") and err.count("\n") == 1
    assert "Traceback" not in err and not out.exists()


def test_json_quoting_matches_a1111_unquote():
    """A1111 reads a quoted value with json.loads; ours must be exactly that."""
    value = 'a, b: "c"\n\u00e9'
    last = format_parameters(_params(model=value)).split("\n")[-1]
    quoted = last.split("Model: ", 1)[1].rsplit(", Version", 1)[0]
    assert json.loads(quoted) == value


def test_sd_parsers_reads_the_image_modes_fields(tmp_path):
    """A1111's own field names for the image modes reach sd-parsers as A1111 metadata, and ours
    (the images' hashes, outpainting) read back as themselves."""
    from sd_parsers import ParserManager
    from sd_parsers.data import Generators

    from pipelines import InpaintParams, OutpaintParams

    image = Image.new("RGB", (64, 64), (10, 20, 30))
    mask = Image.new("L", (64, 64), 255)
    cases = [
        (_params(hires=HiresFix(scale=2.0, steps=4, upscaler="lanczos", strength=0.35)),
         {"Hires upscale": "2.0", "Hires steps": "4", "Hires upscaler": "Lanczos",
          "Denoising strength": "0.35"}),
        (InpaintParams(prompt="a cat", height=64, width=64, seed=3, eta=0.0, init_image=image,
                       mask=mask, mask_blur=6, only_masked=True, padding=16),
         {"Denoising strength": "1.0", "Mask blur": "6", "Inpaint area": "Only masked",
          "Masked area padding": "16"}),
        (OutpaintParams(prompt="a cat", height=64, width=64, seed=3, eta=0.0, init_image=image,
                        left=32), {"Outpaint": "left 32", "Outpaint fill": "edge"}),
    ]
    for k, (params, fields) in enumerate(cases):
        path = tmp_path / f"{k}.png"
        save_png(Image.new("RGB", (8, 8)), path, params)
        info = ParserManager().parse(path)
        assert info.generator == Generators.AUTOMATIC1111
        for key, value in fields.items():
            assert info.metadata[key] == value, key
        if isinstance(params, InpaintParams):
            assert info.metadata["Init image hash"] == params.init_image_hash
        assert read_png_params(path) == params         # and back into the same request
