"""A .safetensors or .ckpt file used directly as a model: converted in memory, nothing written.

The files are written by `ldm convert` from the tiny model folder; generating from them must give
the folder's image, bit for bit (the same float32 weights through the same networks).
"""

import os

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from PIL import Image

from ldm_engine.apps.cli import main
from ldm_engine.components import load_model, vae_factor_of
from ldm_engine.convert import convert
from ldm_engine.convert.errors import UnsafeCheckpointError
from ldm_engine.errors import ModelFolderError
from pipelines import TextToImage

GEN = dict(num_inference_steps=3, guidance_scale=5.0, height=64, width=64, seed=7, progress=False)
PROMPT = "a red cube"


@pytest.fixture(scope="module")
def files(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    out = {}
    for suffix in (".safetensors", ".ckpt"):
        assert main(["convert", str(tiny_dir), str(root / f"tiny{suffix}")]) == 0
        out[suffix] = root / f"tiny{suffix}"
    return out


@pytest.fixture(scope="module")
def folder_pixels(tiny_dir):
    return TextToImage.from_folder(tiny_dir)(PROMPT, **GEN).pixels


def _listing(directory):
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir())


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_single_file_generates_the_folders_image(suffix, files, folder_pixels):
    path = files[suffix]
    before = _listing(path.parent)
    for pipe in (TextToImage.from_single_file(path), TextToImage.from_folder(path)):
        assert torch.equal(pipe(PROMPT, **GEN).pixels, folder_pixels)
        assert pipe.source == path and pipe.name == "tiny"
        assert pipe.components.unet.dtype == torch.float32
    assert _listing(path.parent) == before                  # nothing written beside the file


def test_dtype_and_channels_last_are_honoured(tiny_dir, files):
    from_folder = TextToImage.from_folder(tiny_dir, dtype="bf16")
    pipe = TextToImage.from_single_file(files[".safetensors"], dtype="bf16")
    c = pipe.components
    assert {c.unet.dtype, c.vae.dtype, c.text_encoder.dtype} == {torch.bfloat16}
    # bf16 runs channels_last by default, laid out as the weights load (as from_folder does).
    assert c.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not c.unet.conv_in.weight.is_contiguous()
    assert torch.equal(pipe(PROMPT, **GEN).pixels, from_folder(PROMPT, **GEN).pixels)
    plain = TextToImage.from_single_file(files[".ckpt"], dtype="bf16", channels_last=False)
    assert plain.components.unet.conv_in.weight.is_contiguous()


def test_load_model_takes_a_file_and_the_weights_are_the_folders(tiny_dir, files):
    folder = load_model(tiny_dir)
    single = load_model(files[".ckpt"])
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert single.schedule == folder.schedule
    assert not any(p.requires_grad for p in single.unet.parameters())


def test_vae_factor_from_the_header_alone(files, tmp_path, monkeypatch):
    stripped = tmp_path / "foreign.safetensors"       # no ldm_engine metadata: from the shapes
    safetensors.torch.save_file(safetensors.torch.load_file(str(files[".safetensors"])),
                                str(stripped), metadata={"format": "pt"})

    def no_tensor_reads(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(safetensors, "safe_open", no_tensor_reads)
    monkeypatch.setattr(safetensors.torch, "load_file", no_tensor_reads)
    assert vae_factor_of(files[".safetensors"]) == 8
    assert vae_factor_of(stripped) == 8
    monkeypatch.undo()
    assert vae_factor_of(files[".ckpt"]) == 8                # a pickle is read whole


def test_cli_generates_from_a_single_file(tiny_dir, files, tmp_path):
    args = ["a red cube", "--steps", "2", "--seed", "3", "--dtype", "fp32", "--device", "cpu",
            "--quiet"]
    assert main(["generate", *args, "--model", str(tiny_dir), "--out",
                 str(tmp_path / "folder.png")]) == 0
    for suffix, path in files.items():
        out = tmp_path / f"file{suffix}.png"
        assert main(["generate", *args, "--model", str(path), "--out", str(out)]) == 0
        assert np.array_equal(np.asarray(Image.open(out)),
                              np.asarray(Image.open(tmp_path / "folder.png")))


def test_cli_checks_sizes_before_reading_the_weights(files, tmp_path, capsys, monkeypatch):
    import pipelines.base

    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(pipelines.base, "load_single_file", no_load)
    assert main(["generate", "p", "--model", str(files[".safetensors"]), "--height", "60",
                 "--out", str(tmp_path / "x.png"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "multiple of 8" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


class _Reduce:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_a_malicious_ckpt_is_refused_and_never_runs(tmp_path, capsys, monkeypatch):
    canary = tmp_path / "canary"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2), "x": _Reduce(os.system, f"touch {canary}")}},
               evil)
    real_load = torch.load

    def weights_only_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "torch.load called without weights_only=True"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", weights_only_load)
    with pytest.raises(UnsafeCheckpointError, match="ldm convert --trust-pickle"):
        TextToImage.from_single_file(evil)
    assert main(["generate", "p", "--model", str(evil), "--out", str(tmp_path / "x.png"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and len(err.strip().splitlines()) == 1
    assert not canary.exists() and not (tmp_path / "x.png").exists()


def test_missing_or_unsupported_files(tmp_path, files):
    with pytest.raises(ModelFolderError, match="not found"):
        TextToImage.from_single_file(tmp_path / "none.safetensors")
    weights = safetensors.torch.load_file(str(files[".safetensors"]))
    vae_only = {k: v for k, v in weights.items() if k.startswith("first_stage_model.")}
    safetensors.torch.save_file(vae_only, str(tmp_path / "vae.safetensors"))
    with pytest.raises(ModelFolderError, match="no UNet"):
        TextToImage.from_single_file(tmp_path / "vae.safetensors")


def test_compile_keeps_the_eager_unet_of_a_single_file(files):
    """A folder's compiled pipeline drops its eager UNet weights and re-reads them from the UNet
    file; a single file has none to re-read, so they stay (and nothing tries to read it)."""
    pipe = TextToImage.from_single_file(files[".safetensors"], dtype="bf16", compile=True)
    assert pipe.accelerated.compiled_unet.offload is None
    assert all(p.numel() for p in pipe.components.unet.parameters())


@pytest.mark.slow
def test_compiled_single_file_matches_eager(files, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    eager = TextToImage.from_single_file(files[".safetensors"], dtype="bf16")(PROMPT, **GEN)
    pipe = TextToImage.from_single_file(files[".safetensors"], dtype="bf16", compile=True)
    out = pipe(PROMPT, **GEN)
    assert pipe.accelerated.compiles == 1
    assert all(p.numel() for p in pipe.components.unet.parameters())
    mse = float(((out.pixels - eager.pixels) ** 2).mean())
    assert mse < 10 ** -3.5, mse                          # PSNR > 35 dB, as tests/test_fast.py
