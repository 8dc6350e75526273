"""`ldm` with bad input, end to end: exit status 2, one line on stderr, no traceback, no file
written, and not one network call (the UNet, VAE and text encoder forwards are booby-trapped).

Most rows call `ldm_engine.apps.cli.main(argv)` in-process; a few run the real `ldm` entry point in a
subprocess, including argv bytes that are not UTF-8.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ldm_engine.apps.cli
from ldm_engine.apps.cli import main

LDM = Path(sys.executable).parent / "ldm"


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def _run(argv, capsys, out_dir: Path):
    before = _files(out_dir)
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert _files(out_dir) == before, "a file was written"
    return lines[0]


BIG = str(2**64)

# (extra argv after `generate PROMPT --model M --out OUT --quiet --steps 1`, expected message part)
GENERATE_ROWS = [
    # sizes
    (["--height", "2147483648"], "more than 8x this model's native size"),
    (["--width", "100000"], "width 100000 is more than"),
    (["--height", "100000"], "height 100000 is more than"),
    (["--height", "512", "--width", "512"], "native area"),
    (["--num-images", "1000000"], "1000000 images in one call"),
    (["--num-images", "0"], "--num-images must be at least 1"),
    (["--height", "100"], "multiple of 8"),
    (["--width", "0"], "width must be a positive integer"),
    (["--height", "-8"], "height must be a positive integer"),
    # steps against the model's 1000 training timesteps
    (["--steps", "1001"], "more than the model's 1000 training timesteps"),
    (["--steps", "100000"], "more than the model's 1000 training timesteps"),
    (["--steps", "1000"], "cannot be planned"),                    # leading + steps_offset 1
    (["--steps", "1001", "--sampler", "ddpm"], "training timesteps"),
    (["--steps", "0"], "steps must be a positive integer"),
    # guidance, eta, sampler
    (["--guidance", "nan"], "guidance scale must be a finite number"),
    (["--guidance", "inf"], "guidance scale must be a finite number"),
    (["--eta", "-1"], "eta must be a finite number >= 0"),
    (["--eta", "nan"], "eta must be a finite number >= 0"),
    (["--sampler", "plms"], "valid samplers"),
    # seeds: 64-bit, and image k uses seed + k
    (["--seed", BIG], "seed 18446744073709551616 is too large"),
    (["--seed", str(2**64 - 1), "--num-images", "2"], "too large"),
    (["--seed", "-1"], "seed must be a non-negative integer"),
    (["--seed", "1" * 5000], "invalid int value"),                  # argparse's digit limit
    # prompts
    (["--negative", "a\0b"], "NUL"),
    (["--negative", "bad \udcff byte"], "lone surrogate"),
]


@pytest.mark.parametrize("extra,message", GENERATE_ROWS, ids=[" ".join(r[0])[:40] for r in
                                                               GENERATE_ROWS])
def test_bad_generate_argument(tiny_dir, tmp_path, capsys, no_compute, extra, message):
    line = _run(["generate", "a red circle", "--model", str(tiny_dir), "--out",
                 str(tmp_path / "x.png"), "--quiet", "--steps", "1", *extra], capsys, tmp_path)
    assert line.startswith("ldm generate: error: ") and message in line, line
    assert no_compute["load"] == 0, "the weights were read before the error"


@pytest.mark.parametrize("prompt,message", [
    ("nul \0 byte", "NUL"),
    ("lone \ud800 surrogate", "lone surrogate"),
    ("caf\udce9", "lone surrogate"),         # what Python makes of the argv bytes b"caf\xe9"
])
def test_bad_prompt(tiny_dir, tmp_path, capsys, no_compute, prompt, message):
    line = _run(["generate", prompt, "--model", str(tiny_dir), "--out", str(tmp_path / "x.png"),
                 "--quiet"], capsys, tmp_path)
    assert message in line and no_compute["load"] == 0


def _out_rows(tmp: Path):
    (tmp / "sub").mkdir()
    (tmp / "g-1.png").mkdir()                  # image 1 of a batch would land on a folder
    return [
        ([str(tmp)], "is a folder"),
        ([str(tmp / "sub")], "is a folder"),
        ([str(tmp / "missing" / "x.png")], "does not exist"),
        (["/proc/x.png"], "cannot write into /proc"),
        ([str(tmp / ("a" * 300 + ".png"))], "longer than"),
        ([str(tmp / "g.png"), "--num-images", "2"], "g-1.png is a folder"),
    ]


def test_bad_out(tiny_dir, tmp_path, capsys, no_compute):
    for out, message in _out_rows(tmp_path):
        line = _run(["generate", "p", "--model", str(tiny_dir), "--quiet", "--out", *out], capsys,
                    tmp_path)
        assert message in line, (out, line)
    assert no_compute["load"] == 0


def _broken_copy(tiny_dir: Path, dest: Path) -> Path:
    """A copy of the tiny model whose files are symlinks to the (read-only) original."""
    shutil.copytree(tiny_dir, dest, copy_function=os.symlink)
    return dest


def _replace(path: Path, data: bytes) -> None:
    path.unlink()                                  # never write through the symlink
    path.write_bytes(data)


def _edit_config(root: Path, rel: str, **changes) -> None:
    cfg = json.loads((root / rel).read_text())
    for key, value in changes.items():
        if value is _DROP:
            cfg.pop(key)
        else:
            cfg[key] = value
    _replace(root / rel, json.dumps(cfg).encode())


_DROP = object()

MODEL_ROWS = {
    "vae block_out_channels missing": (
        lambda r: _edit_config(r, "vae/config.json", block_out_channels=_DROP),
        "missing block_out_channels"),
    "vae block_out_channels int": (
        lambda r: _edit_config(r, "vae/config.json", block_out_channels=64),
        "block_out_channels=64 is invalid"),
    "unet block_out_channels abc": (
        lambda r: _edit_config(r, "unet/config.json", block_out_channels="abc"),
        "block_out_channels='abc' is invalid"),
    "unet layers float": (
        lambda r: _edit_config(r, "unet/config.json", layers_per_block=1.0),
        "layers_per_block=1.0 is invalid"),
    "unet groups do not divide": (
        lambda r: _edit_config(r, "unet/config.json", norm_num_groups=7),
        "norm_num_groups"),
    "text hidden_size -1": (
        lambda r: _edit_config(r, "text_encoder/config.json", hidden_size=-1),
        "hidden_size=-1 is invalid"),
    "text too few positions": (
        lambda r: _edit_config(r, "text_encoder/config.json", max_position_embeddings=16),
        "max_position_embeddings=16 is invalid"),
    "cross attention mismatch": (
        lambda r: _edit_config(r, "unet/config.json", cross_attention_dim=48),
        "does not match the text encoder's hidden_size"),
    "vae scaling_factor 0": (
        lambda r: _edit_config(r, "vae/config.json", scaling_factor=0),
        "scaling_factor=0 is invalid"),
    "config not UTF-8": (
        lambda r: _replace(r / "unet/config.json", b'{"sample_size": "\xff"}'),
        "is not UTF-8"),
    "config not JSON": (
        lambda r: _replace(r / "vae/config.json", b"{"), "is not valid JSON"),
    "config a list": (
        lambda r: _replace(r / "vae/config.json", b"[1, 2]"), "must hold a JSON object"),
    "scheduler too long": (
        lambda r: _edit_config(r, "scheduler/scheduler_config.json",
                               num_train_timesteps=10**9), "num_train_timesteps"),
    "scheduler unknown beta schedule": (
        lambda r: _edit_config(r, "scheduler/scheduler_config.json", beta_schedule="cosine"),
        "beta_schedule='cosine' is invalid"),
    "weights not safetensors": (
        lambda r: _replace(r / "unet/diffusion_pytorch_model.safetensors", b"\0" * 64),
        "diffusion_pytorch_model.safetensors"),
    "weights missing": (
        lambda r: (r / "vae/diffusion_pytorch_model.safetensors").unlink(), "missing"),
    "empty folder": (
        lambda r: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in list(r.iterdir())],
        "missing model_index.json"),
}


@pytest.mark.parametrize("case", list(MODEL_ROWS))
def test_broken_model_folder(tiny_dir, tmp_path, capsys, no_compute, case):
    breaker, message = MODEL_ROWS[case]
    model = _broken_copy(tiny_dir, tmp_path / "model")
    breaker(model)
    out = tmp_path / "out"
    out.mkdir()
    line = _run(["generate", "p", "--model", str(model), "--out", str(out / "x.png"), "--quiet"],
                capsys, out)
    assert message in line, line
    assert no_compute["load"] == 0


def test_missing_model(tmp_path, capsys, no_compute):
    line = _run(["generate", "p", "--model", str(tmp_path / "none"), "--out",
                 str(tmp_path / "x.png"), "--quiet"], capsys, tmp_path)
    assert "model folder not found" in line


@pytest.mark.parametrize("argv,message", [
    (["generate", "p", "--steps", "abc"], "ldm generate: error: argument --steps: invalid int"),
    (["generate", "p", "--dtype", "fp8"], "ldm generate: error: argument --dtype: invalid choice"),
    (["generate", "p", "--bogus"], "ldm: error: unrecognized arguments: --bogus"),
    (["generate", "p", "--guidance", "x"], "argument --guidance: invalid float value"),
    ([], "ldm: error: the following arguments are required: command (see ldm --help)"),
    (["frobnicate"], "ldm: error: argument command: invalid choice"),
    (["inspect"], "ldm inspect: error: the following arguments are required: path"),
])
def test_argparse_errors_are_one_line(tmp_path, capsys, argv, message):
    line = _run(argv, capsys, tmp_path)
    assert message in line and line.endswith("--help)"), line


def test_no_prompt(tmp_path, capsys, no_compute):
    line = _run(["generate", "--out", str(tmp_path / "x.png")], capsys, tmp_path)
    assert "give a PROMPT" in line


def test_no_size_limit_lifts_the_family_limit(tiny_dir, tmp_path, capsys):
    """576 px is over 8x the tiny model's 64 px: refused, then made with --no-size-limit."""
    argv = ["generate", "p", "--model", str(tiny_dir), "--out", str(tmp_path / "w.png"),
            "--quiet", "--steps", "1", "--height", "64", "--width", "576"]
    assert main(argv) == 2 and "--no-size-limit" in capsys.readouterr().err
    assert main([*argv, "--no-size-limit"]) == 0
    assert (tmp_path / "w.png").is_file()


def test_warnings_are_one_line_each(tiny_dir, tmp_path, capsys):
    """fp16 on the CPU (a Python warning): one `ldm generate: warning:` line each, no source
    lines; a library's multi-line log warning likewise. A long prompt is no longer truncated
    (75-token windows, pipelines.prompts), so it warns of nothing."""
    out = tmp_path / "x.png"
    rc = main(["generate", "circle " * 100, "--model", str(tiny_dir), "--out", str(out),
               "--quiet", "--steps", "1", "--dtype", "fp16", "--device", "cpu", "--guidance",
               "1"])
    err = capsys.readouterr().err
    assert rc == 0 and out.is_file(), err
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("ldm generate: warning: ") for line in lines), err
    assert any("fp16 on the CPU" in line for line in lines)
    assert not any("truncat" in line.lower() for line in lines)


def test_logged_warnings_are_one_line(tmp_path, capsys, monkeypatch):
    import logging
    import warnings

    def noisy(args):
        logging.getLogger("transformers.modeling_utils").warning("two\nlines")
        logging.getLogger("ldm_engine.pipelines").warning("ours %s", "too")
        warnings.warn("a\nwarning")
        return 0

    monkeypatch.setattr(ldm_engine.apps.cli, "cmd_inspect", noisy)
    lib = logging.getLogger("transformers")
    before = (lib.propagate, lib.handlers[:])
    assert main(["inspect", str(tmp_path)]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "ldm inspect: warning: two lines", "ldm inspect: warning: ours too",
        "ldm inspect: warning: a warning"]
    # The library's own handlers and propagation are back afterwards, as they were.
    assert (lib.propagate, lib.handlers) == before


def _subprocess(argv: list, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([str(LDM), *argv], capture_output=True, cwd=tmp_path, env=env,
                          timeout=300)


def _check_real(rows, tmp_path: Path) -> None:
    for argv, message in rows:
        before = _files(tmp_path)
        proc = _subprocess(argv, tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert b"Traceback" not in proc.stderr and message in lines[0], proc.stderr
        assert _files(tmp_path) == before


def test_real_entry_point(tiny_dir, tmp_path):
    """The installed `ldm` script: argv bytes that are not UTF-8 (which Python turns into lone
    surrogates) and a usage error."""
    assert LDM.is_file()
    _check_real([
        ([b"generate", b"caf\xe9", b"--model", bytes(tiny_dir)], b"lone surrogate"),
        ([b"generate", b"p", b"--steps", b"abc"], b"invalid int value"),
    ], tmp_path)


@pytest.mark.slow
def test_real_entry_point_more(tiny_dir, tmp_path):
    broken = _broken_copy(tiny_dir, tmp_path / "broken")
    _edit_config(broken, "vae/config.json", block_out_channels=64)
    _check_real([
        ([b"generate", b"p", b"--model", bytes(tiny_dir), b"--height", b"2147483648"],
         b"native size"),
        ([b"generate", b"p", b"--model", bytes(tiny_dir), b"--out", bytes(tmp_path)],
         b"is a folder"),
        ([b"generate", b"p", b"--model", bytes(broken)], b"block_out_channels=64"),
        ([b"generate", b"p", b"--model", bytes(tmp_path / "none")], b"model folder not found"),
    ], tmp_path)
