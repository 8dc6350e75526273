"""The `ldm` image commands of every mode, end to end on the tiny model folder (2 steps).

Each command writes PNGs of the right size whose parameters read back as its mode's request
type; --from-image re-makes img2img, inpaint and hires-fix images pixel for pixel; bad input
ends with one line on stderr and exit 2 before the weights are read.
"""

import dataclasses
import subprocess
import sys
import typing

import numpy as np
import pytest
from PIL import Image

import pipelines.params as params
from ldm_engine.apps.cli import REQUEST_TYPES, main, request_source
from pipelines import PIPELINES, read_png_params, save_png
from pipelines.params import image_hash

TWO_STEPS = ["--steps", "2", "--seed", "3", "--quiet", "--device", "cpu", "--dtype", "fp32"]


def needs_mode(name: str):
    """Modes written by other parts of the engine may not be registered yet."""
    return pytest.mark.skipif(name not in PIPELINES,
                              reason=f"pipelines.registry has no {name!r} mode yet")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A 64 x 64 RGB init image, a mask with a white square in the middle, an all-black mask,
    a mask of another size and a file that is no image."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "in.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "other.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.new("L", (64, 64), 0).save(root / "black.png")
    Image.new("L", (32, 32), 255).save(root / "small-mask.png")
    (root / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _make(argv, capsys):
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured


# --- defaults: read from pipelines/params.py's source, equal to the dataclasses ------------

def test_help_defaults_are_the_request_types():
    """The CLI reads defaults and choices from params.py's source (no torch at parse time);
    that reading must agree with the imported dataclasses exactly."""
    classes, literals = request_source()
    for name in [*REQUEST_TYPES.values(), "HiresFix"]:
        cls = getattr(params, name)
        expected = {f.name: f.default for f in dataclasses.fields(cls)
                    if f.default is not dataclasses.MISSING}
        got = {k: v for k, v in classes[name].items() if k in expected}
        assert got == expected, name
    for name in ("ResizeMode", "InitLatents", "Upscaler", "OutpaintFill"):
        assert literals[name] == typing.get_args(getattr(params, name))


def test_parsing_does_not_import_torch():
    """Building the parser (and so `ldm CMD --help`) reads params.py's source, not the module."""
    code = ("import sys; from ldm_engine.apps.cli import build_parser; "
            "build_parser().parse_args(['img2img', 'p', '--image', 'x.png']); "
            "print('torch' in sys.modules, 'pipelines' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "False"]


def test_help_shows_the_defaults(capsys):
    assert main(["img2img", "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default 0.75)" in out and "(default 30)" in out and "examples:" in out
    assert main(["inpaint", "--help"]) == 0
    out = capsys.readouterr().out
    assert "white = repaint" in out and "(default 1)" in out      # InpaintParams.strength


# --- each command, and re-making its images ---------------------------------------------------

def test_generate_hires_fix_and_replay(tiny_dir, tmp_path, capsys):
    out = tmp_path / "h.png"
    _make(["generate", "a red circle", "--model", str(tiny_dir), "--out", str(out), *TWO_STEPS,
           "--hires-fix", "--hires-scale", "1.5", "--hires-steps", "2"], capsys)
    assert Image.open(out).size == (96, 96)              # 64 native x 1.5
    p = read_png_params(out)
    assert type(p) is params.GenerationParams
    assert p.hires == params.HiresFix(scale=1.5, steps=2)   # the rest HiresFix's defaults
    again = tmp_path / "again.png"
    _make(["generate", "--from-image", str(out), "--model", str(tiny_dir), "--out", str(again),
           "--quiet"], capsys)
    assert np.array_equal(_pixels(out), _pixels(again))


def test_img2img_and_replay(tiny_dir, images, tmp_path, capsys):
    out = tmp_path / "i.png"
    _make(["img2img", "a blue square", "--image", str(images / "in.png"), "--strength", "0.5",
           "--model", str(tiny_dir), "--out", str(out), *TWO_STEPS], capsys)
    assert Image.open(out).size == (64, 64)
    p = read_png_params(out)
    assert type(p) is params.ImageToImageParams
    assert (p.strength, p.steps, p.seed, p.prompt) == (0.5, 2, 3, "a blue square")
    assert p.init_image_hash == image_hash(Image.open(images / "in.png").convert("RGB"))
    again = tmp_path / "again.png"
    cap = _make(["img2img", "--from-image", str(out), "--image", str(images / "in.png"),
                 "--model", str(tiny_dir), "--out", str(again), "--quiet"], capsys)
    assert "warning" not in cap.err
    assert np.array_equal(_pixels(out), _pixels(again))
    # Another init image: made, with one warning line naming the hash mismatch.
    third = tmp_path / "third.png"
    cap = _make(["img2img", "--from-image", str(out), "--image", str(images / "other.png"),
                 "--model", str(tiny_dir), "--out", str(third), "--quiet"], capsys)
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldm img2img: warning: ") \
        and "is not the init image" in lines[0], cap.err
    assert not np.array_equal(_pixels(out), _pixels(third))


def test_img2img_size_options(tiny_dir, images, tmp_path, capsys):
    out = tmp_path / "w.png"
    _make(["img2img", "x", "--image", str(images / "in.png"), "--height", "48", "--width", "80",
           "--resize-mode", "crop", "--init-latents", "mode", "--model", str(tiny_dir), "--out",
           str(out), "--num-images", "2", *TWO_STEPS], capsys)
    for k in range(2):
        p = read_png_params(tmp_path / f"w-{k}.png")
        assert Image.open(tmp_path / f"w-{k}.png").size == (80, 48)
        assert (p.resize_mode, p.init_latents, p.seed) == ("crop", "mode", 3 + k)


@needs_mode("inpaint")
def test_inpaint_and_replay(tiny_dir, images, tmp_path, capsys):
    out = tmp_path / "p.png"
    _make(["inpaint", "a star", "--image", str(images / "in.png"), "--mask",
           str(images / "mask.png"), "--mask-blur", "2", "--model", str(tiny_dir), "--out",
           str(out), *TWO_STEPS], capsys)
    assert Image.open(out).size == (64, 64)
    p = read_png_params(out)
    assert type(p) is params.InpaintParams
    assert p.mask_blur == 2 and p.mask_hash == image_hash(Image.open(images / "mask.png"))
    again = tmp_path / "again.png"
    _make(["inpaint", "--from-image", str(out), "--image", str(images / "in.png"), "--mask",
           str(images / "mask.png"), "--model", str(tiny_dir), "--out", str(again), "--quiet"],
          capsys)
    assert np.array_equal(_pixels(out), _pixels(again))


@needs_mode("outpaint")
def test_outpaint(tiny_dir, images, tmp_path, capsys):
    out = tmp_path / "o.png"
    _make(["outpaint", "more", "--image", str(images / "in.png"), "--right", "16", "--top", "8",
           "--fill", "color", "--color", "10,20,30", "--model", str(tiny_dir), "--out", str(out),
           *TWO_STEPS], capsys)
    assert Image.open(out).size == (80, 72)
    p = read_png_params(out)
    assert type(p) is params.OutpaintParams
    assert (p.right, p.top, p.fill, p.color) == (16, 8, "color", (10, 20, 30))


@needs_mode("vary")
def test_vary(tiny_dir, images, tmp_path, capsys):
    out = tmp_path / "v.png"
    cap = _make(["vary", "noise", "--image", str(images / "in.png"), "--num-images", "2",
                 "--psnr", "--model", str(tiny_dir), "--out", str(out), *TWO_STEPS], capsys)
    assert "inversion reconstruction PSNR: " in cap.out
    for k in range(2):
        assert Image.open(tmp_path / f"v-{k}.png").size == (64, 64)
        assert type(read_png_params(tmp_path / f"v-{k}.png")) is params.VariationParams


@needs_mode("interpolate")
def test_interpolate(tiny_dir, tmp_path, capsys):
    out = tmp_path / "f.png"
    _make(["interpolate", "a red circle", "--to", "a blue square", "--frames", "3",
           "--gif", str(tmp_path / "f.gif"), "--model", str(tiny_dir), "--out", str(out),
           *TWO_STEPS], capsys)
    for k in range(3):
        assert Image.open(tmp_path / f"f-{k}.png").size == (64, 64)
        assert type(read_png_params(tmp_path / f"f-{k}.png")) is params.InterpolationParams
    assert Image.open(tmp_path / "f-grid.png").size == (192, 64)    # one row
    assert Image.open(tmp_path / "f.gif").n_frames >= 2
    # A frame's PNG names its frame: re-made alone, the same image. Not bit for bit: alone it
    # is a batch of one, and CPU matmuls of another batch size round differently (seen: one
    # 8-bit level in one of 12288 values).
    again = tmp_path / "again.png"
    _make(["interpolate", "--from-image", str(tmp_path / "f-1.png"), "--model", str(tiny_dir),
           "--out", str(again), "--quiet"], capsys)
    diff = np.abs(_pixels(tmp_path / "f-1.png").astype(int) - _pixels(again).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


@needs_mode("edit")
def test_edit(tiny_dir, images, tmp_path, capsys):
    out = tmp_path / "e.png"
    _make(["edit", "noise", "--to", "a red circle", "--image", str(images / "in.png"),
           "--amounts", "0.5,1", "--model", str(tiny_dir), "--out", str(out), *TWO_STEPS], capsys)
    for k in range(2):
        assert type(read_png_params(tmp_path / f"e-{k}.png")) is params.EditParams
    assert Image.open(tmp_path / "e-grid.png").size == (128, 64)
    again = tmp_path / "again.png"
    _make(["edit", "--from-image", str(tmp_path / "e-1.png"), "--image", str(images / "in.png"),
           "--model", str(tiny_dir), "--out", str(again), "--quiet"], capsys)
    diff = np.abs(_pixels(tmp_path / "e-1.png").astype(int) - _pixels(again).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3      # as for interpolate


# --- bad input: one line, exit 2, no weights read -------------------------------------------

def _png_of(request, path):
    """A PNG carrying a request's parameters, written without running anything."""
    save_png(Image.new("RGB", (64, 64)), path, request.replace(height=64, width=64))
    return path


BAD_ROWS = [
    # (argv after the command, with {in}/{mask}/... the input files; expected message part)
    (["img2img", "p", "--image", "{root}/none.png"], "init image not found"),
    (["img2img", "p", "--image", "{root}/garbage.png"], "cannot read the init image"),
    (["img2img", "p", "--image", "{in}", "--strength", "1.5"], "strength"),
    (["img2img", "p", "--image", "{in}", "--strength", "0"], "strength"),
    (["img2img", "p", "--image", "{in}", "--height", "60"], "multiple of 8"),
    (["img2img", "p", "--image", "{in}", "--resize-mode", "zoom"], "invalid choice"),
    (["img2img", "p"], "the following arguments are required: --image"),
    (["inpaint", "p", "--image", "{in}", "--mask", "{root}/small-mask.png"],
     "the mask is 32x32 but the image is 64x64"),
    (["inpaint", "p", "--image", "{in}", "--mask", "{root}/black.png"], "nothing to repaint"),
    (["inpaint", "p", "--image", "{in}", "--mask", "{mask}", "--padding", "-1"], "padding"),
    (["outpaint", "p", "--image", "{in}"], "at least one of left/right/top/bottom"),
    (["outpaint", "p", "--image", "{in}", "--right", "5"],
     "canvas width 69 is not a multiple of 8"),
    (["outpaint", "p", "--image", "{in}", "--top", "8", "--color", "1,2"], "R,G,B"),
    (["interpolate", "p", "--frames", "1"], "frames >= 2"),
    (["interpolate", "p", "--gif", "{root}/x.mp4"], "must end in .gif or .webp"),
    (["interpolate", "p", "--num-images", "2"], "--num-images is not for it"),
    (["edit", "p", "--to", "q", "--image", "{in}", "--amounts", "0.5,x"], "--amounts"),
    (["edit", "p", "--image", "{in}"], "needs a target_prompt"),
    (["generate", "p", "--hires-scale", "2"], "--hires-scale needs --hires-fix"),
    (["generate", "p", "--hires-fix", "--hires-scale", "0.5"], "hires scale must be"),
    (["generate", "p", "--hires-fix", "--hires-scale", "16"], "hires scale must be"),
    (["generate", "p", "--hires-fix", "--hires-strength", "2"], "strength"),
    (["generate", "--from-image", "{img2img_png}"], "re-make it with `ldm img2img"),
    (["inpaint", "--from-image", "{img2img_png}", "--image", "{in}", "--mask", "{mask}"],
     "made by `ldm img2img`"),
]


@pytest.mark.parametrize("argv,message", BAD_ROWS, ids=[" ".join(r[0])[:40] for r in BAD_ROWS])
def test_bad_input(tiny_dir, images, tmp_path, capsys, no_compute, argv, message):
    img = Image.open(images / "in.png").convert("RGB")
    names = {"root": str(images), "in": str(images / "in.png"),
             "mask": str(images / "mask.png"),
             "img2img_png": str(_png_of(params.ImageToImageParams(prompt="p", init_image=img),
                                        tmp_path / "made.png"))}
    argv = [a.format(**names) for a in argv]
    out = tmp_path / "out"
    out.mkdir()
    rc = main([*argv, "--model", str(tiny_dir), "--out", str(out / "x.png"), "--quiet"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    assert not any(out.iterdir()), "a file was written"
    assert no_compute["load"] == 0, "the weights were read before the error"
