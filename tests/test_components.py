"""Model folders: diffusers layout both ways, atomic saves, clear errors for broken folders."""

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from ldm_engine.components import (TEXT_WEIGHTS, UNET_WEIGHTS, build_random, detect_family,
                                   load_model, parameter_counts, save_model)
from ldm_engine.configs import FAMILIES, TINY, get_family
from ldm_engine.errors import ModelFolderError


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_load_round_trip_is_exact(tiny_components, tiny_dir):
    loaded = load_model(tiny_dir)
    for name in ("unet", "vae", "text_encoder"):
        assert _state_equal(getattr(tiny_components, name), getattr(loaded, name)), name
    assert loaded.schedule == tiny_components.schedule
    assert loaded.vae_factor == 8


def test_diffusers_and_transformers_load_our_folder(tiny_components, tiny_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(tiny_dir / "vae", local_files_only=True)
    text = CLIPTextModel.from_pretrained(tiny_dir / "text_encoder", local_files_only=True)
    assert _state_equal(unet, tiny_components.unet)
    assert _state_equal(vae, tiny_components.vae)
    assert _state_equal(text, tiny_components.text_encoder)
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_fp16_save_casts_weights_and_loads_back(tiny_components, tmp_path):
    save_model(tiny_components, tmp_path / "half", dtype=torch.float16)
    loaded = load_model(tmp_path / "half")               # loads as float32 by default
    assert loaded.unet.dtype == torch.float32
    w = tiny_components.unet.conv_in.weight
    assert torch.equal(loaded.unet.conv_in.weight, w.half().float())
    assert not torch.equal(loaded.unet.conv_in.weight, w)


def test_save_refuses_to_clobber_and_overwrite_is_complete(tiny_components, tiny_dir, tmp_path):
    dest = tmp_path / "m"
    shutil.copytree(tiny_dir, dest)
    with pytest.raises(FileExistsError):
        save_model(tiny_components, dest)
    other = build_random(TINY, seed=1)
    save_model(other, dest, overwrite=True)
    assert _state_equal(load_model(dest).unet, other.unet)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp leftovers


def test_interrupted_save_leaves_existing_model_untouched(tiny_components, tiny_dir, tmp_path,
                                                          monkeypatch):
    dest = tmp_path / "m"
    shutil.copytree(tiny_dir, dest)
    before = (dest / UNET_WEIGHTS).read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny_components.tokenizer, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(tiny_components, dest, overwrite=True)
    assert (dest / UNET_WEIGHTS).read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("missing", ["model_index.json", "unet/config.json", UNET_WEIGHTS,
                                     "vae/diffusion_pytorch_model.safetensors", TEXT_WEIGHTS,
                                     "scheduler/scheduler_config.json"])
def test_incomplete_folder_names_the_missing_file(tiny_dir, tmp_path, missing):
    dest = tmp_path / "m"
    shutil.copytree(tiny_dir, dest)
    (dest / missing).unlink()
    with pytest.raises(ModelFolderError, match=missing.replace(".", r"\.")):
        load_model(dest)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="not found"):
        load_model(tmp_path / "nope")


@pytest.mark.parametrize("damage", ["empty", "truncated", "lfs", "garbage"])
def test_damaged_weights_are_reported_by_name(tiny_dir, tmp_path, damage):
    dest = tmp_path / "m"
    shutil.copytree(tiny_dir, dest)
    f = dest / UNET_WEIGHTS
    data = f.read_bytes()
    f.write_bytes({"empty": b"",
                   "truncated": data[: len(data) // 2],
                   "lfs": b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n",
                   "garbage": b"\x00" * 7 + b"not a checkpoint at all" * 10}[damage])
    with pytest.raises(ModelFolderError, match="unet"):
        load_model(dest)


def test_missing_tokenizer_falls_back_to_offline_vocabulary(tiny_dir, tmp_path):
    dest = tmp_path / "m"
    shutil.copytree(tiny_dir, dest)
    shutil.rmtree(dest / "tokenizer")
    ids = load_model(dest).tokenizer(["a red circle"])
    assert torch.equal(ids, load_model(tiny_dir).tokenizer(["a red circle"]))


def test_family_detection_and_registry():
    assert set(FAMILIES) == {"sd1", "sd2", "tiny"}
    for fam in FAMILIES.values():
        assert detect_family(fam.unet.to_diffusers(), fam.text_encoder.to_transformers()) == fam.name
    assert detect_family({"block_out_channels": [1, 2]}, {}) == "custom"
    with pytest.raises(ValueError, match="sd1, sd2, tiny"):
        get_family("sdxl")


def test_tiny_family_is_small_and_sd1_shaped(tiny_components):
    counts = parameter_counts(tiny_components)
    assert counts["unet"] < 3_000_000
    assert tiny_components.unet.config.cross_attention_dim == \
        tiny_components.text_encoder.config.hidden_size
