"""The bundled default model: present, small, loadable, and drawing what it drew when trained."""

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_engine.apps.cli import BUNDLED_MODEL, main
from ldm_engine.inspection import inspect_folder
from pipelines import TextToImage, read_png_params
from train.oracle import grade
from train.shapes import EvalPrompt, Scene, ShapeObject

GOLDEN = Path(__file__).parent / "golden" / "default-model.png"
# The golden image's request; the PNG itself carries it too.
PROMPT = "a yellow triangle in the centre, green background"
SCENE = Scene(objects=(ShapeObject("triangle", "yellow", "large", "centre"),), background="green")


@pytest.fixture(scope="module")
def pipe():
    return TextToImage.from_folder(BUNDLED_MODEL)


def test_bundled_model_is_small_and_complete():
    total = sum(p.stat().st_size for p in BUNDLED_MODEL.rglob("*") if p.is_file())
    assert total <= 30 * 2**20, f"bundled model is {total / 2**20:.1f} MiB (limit 30 MiB)"
    report = inspect_folder(BUNDLED_MODEL)
    assert report["components"]["unet"]["dtypes"] == {"F16": report["components"]["unet"]
                                                       ["parameters"]}


def test_golden_image(pipe):
    """Same seed -> the image committed when the model was trained (CPU float tolerance)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # its parameters are all ones this engine honours
        params = read_png_params(GOLDEN)
    assert params.prompt == PROMPT
    again = np.asarray(pipe.regenerate(params, progress=False).images[0], dtype=np.int16)
    golden = np.asarray(Image.open(GOLDEN).convert("RGB"), dtype=np.int16)
    diff = np.abs(again - golden)
    assert diff.mean() < 1.0 and diff.max() <= 24, (diff.mean(), diff.max())


def test_cli_defaults_to_the_bundled_model(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["generate", PROMPT, "--out", str(out), "--steps", "4", "--seed", "1",
                 "--quiet"]) == 0
    assert Image.open(out).size == (64, 64)
    assert read_png_params(out).model == "default"


def test_bundled_model_draws_the_prompt(pipe):
    """A training-distribution prompt over several seeds: the oracle reads back what was asked.

    (Held-out accuracy is `ldm eval`'s job; this guards against a broken or swapped model.
    Measured when the model was trained: 6 of 6 seeds right in every category.)"""
    res = pipe([PROMPT] * 4, num_inference_steps=25, guidance_scale=5.0, seed=0, progress=False)
    prompt = EvalPrompt(PROMPT, SCENE, background_specified=True, size_specified=False)
    grades = [grade(prompt, im) for im in res.images]
    for key in ("colour_shape", "position"):
        assert sum(bool(g[key]) for g in grades) >= 3, (key, grades)


def test_bundled_model_carries_its_clip():
    """The clip stage's image tower ships with the model: zero-shot colour classification of
    held-out one-object scenes (train.clip_eval; measured 97.3 % on 300 scenes when it was
    trained) stays well above chance (1/7) on a smaller sample."""
    from ldm_engine.clip import load_clip
    from train.clip_eval import evaluate_clip

    clip = load_clip(BUNDLED_MODEL)
    result = evaluate_clip(clip, n_single=60, n_pairs=20)
    assert result.colour >= 0.85, result
    assert result.shape > 1 / 3, result
