"""The `ldm` command: generate and inspect, one-line errors with a non-zero exit, no tracebacks."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ldm_engine.apps.cli import main
from pipelines import read_png_params


def test_generate_writes_png_with_parameters(tiny_dir, tmp_path, capsys):
    out = tmp_path / "a.png"
    rc = main(["generate", "a red circle", "--model", str(tiny_dir), "--out", str(out),
               "--steps", "2", "--seed", "5", "--guidance", "3", "--negative", "blue",
               "--quiet"])
    assert rc == 0 and out.is_file()
    params = read_png_params(out)
    assert (params.prompt, params.negative_prompt, params.steps, params.seed) == \
        ("a red circle", "blue", 2, 5)
    assert params.guidance_scale == 3.0 and params.model == "tiny"
    # Re-making it from its own metadata gives the same pixels.
    again = tmp_path / "b.png"
    assert main(["generate", "--from-image", str(out), "--model", str(tiny_dir), "--out",
                 str(again), "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_generate_several_images(tiny_dir, tmp_path, capsys):
    rc = main(["generate", "x", "--model", str(tiny_dir), "--out", str(tmp_path / "g.png"),
               "--steps", "1", "--seed", "9", "--num-images", "2", "--quiet"])
    assert rc == 0
    seeds = [read_png_params(tmp_path / f"g-{k}.png").seed for k in range(2)]
    assert seeds == [9, 10]


def test_inspect_folder(tiny_dir, capsys):
    assert main(["inspect", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "family tiny" in out and "unet" in out and "F32" in out and "parameters" in out


@pytest.mark.parametrize("args,message", [
    (["--height", "100"], "multiple of 8"),
    (["--steps", "0"], "steps"),
    (["--guidance", "nan"], "guidance"),
    (["--sampler", "plms"], "valid samplers"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_dir, tmp_path, capsys, args, message):
    rc = main(["generate", "p", "--model", str(tiny_dir), "--out", str(tmp_path / "x.png"),
               "--quiet", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_missing_model_folder_is_reported(tmp_path, capsys):
    assert main(["generate", "p", "--model", str(tmp_path / "none"), "--quiet"]) == 2
    assert "model folder not found" in capsys.readouterr().err


def test_console_script_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ldm_engine.apps.cli", "inspect", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "missing model_index.json" in proc.stderr
