"""Training: configs, data, exact resume, process-count check, 2-process equivalence (slow)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

import train.runtime as runtime
from pipelines import TextToImage
from train import load_config, main
from train.data import read_imagefolder
from train.shapes import write_imagefolder

ROOT = Path(__file__).resolve().parents[1]

# Toy widths: every stage runs in seconds; the architecture keeps its real structure.
TOY = [
    "data.num_images=48", "data.size=32",
    "clip.steps=2", "clip.batch_size=16", "clip.hidden_size=32", "clip.layers=1", "clip.heads=2",
    "clip.vision_hidden_size=32", "clip.vision_layers=1", "clip.projection_dim=16",
    "vae.steps=2", "vae.batch_size=8", "vae.block_out_channels=[32, 32]",
    "unet.steps=4", "unet.batch_size=8", "unet.block_out_channels=[32, 32]",
    "unet.down_block_types=[DownBlock2D, CrossAttnDownBlock2D]",
    "unet.up_block_types=[CrossAttnUpBlock2D, UpBlock2D]", "unet.mixed_precision=fp32",
    "unet.warmup_steps=1", "checkpoint_every=2", "keep_checkpoints=1", "sample_every=0",
    "log_every=1",
]


def toy_config(out: Path, *extra: str):
    return load_config(ROOT / "train/configs/default.yaml",
                       TOY + [f"output_dir={out}", f"model_dir={out / 'model'}",
                              "save_dtype=fp32", *extra])


def weights(folder: Path) -> dict:
    return safetensors.torch.load_file(str(folder / "unet/diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """All three stages, 4 UNet steps without interruption."""
    out = tmp_path_factory.mktemp("straight")
    return main(toy_config(out)), out


def test_full_recipe_writes_a_loadable_model(straight):
    model, out = straight
    res = TextToImage.from_folder(model)("a red circle on the left", num_inference_steps=2,
                                         seed=0, progress=False)
    assert res.images[0].size == (32, 32)
    assert (out / "logs").is_dir() and any((out / "logs").rglob("events.out.tfevents*"))
    # Only the newest complete checkpoint is kept, and it is marked complete.
    ckpts = sorted((out / "unet/checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step-000004"]
    assert json.loads((ckpts[0] / "state.json").read_text()) == {"step": 4}


def test_interrupted_then_resumed_equals_straight(straight, tmp_path, monkeypatch):
    model, out = straight
    for stage in ("clip", "vae", "cache"):
        shutil.copytree(out / stage, tmp_path / stage)
    save = runtime.Checkpoints.save

    def save_then_crash(self, accelerator, step, m):
        path = save(self, accelerator, step, m)
        if step == 2:
            raise KeyboardInterrupt("simulated crash after step 2")
        return path

    monkeypatch.setattr(runtime.Checkpoints, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        main(toy_config(tmp_path, "stages=[unet]"))
    assert not (tmp_path / "model").exists()
    monkeypatch.setattr(runtime.Checkpoints, "save", save)
    resumed = main(toy_config(tmp_path, "stages=[unet]", "resume=latest"))
    a, b = weights(model), weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resume diverged from the straight run"


def test_fresh_run_differs_from_a_different_seed(straight, tmp_path):
    model, out = straight
    for stage in ("clip", "vae", "cache"):
        shutil.copytree(out / stage, tmp_path / stage)
    other = main(toy_config(tmp_path, "stages=[unet]", "seed=1", "data.num_images=48"))
    a, b = weights(model), weights(other)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config(ROOT / "train/configs/default.yaml",
                      ["unet.steps=7", "unet.lr=0.001", "unet.cache=false", "stages=[vae]"])
    assert cfg.unet.steps == 7 and cfg.unet.lr == 1e-3 and cfg.unet.cache is False
    assert cfg.stages == ("vae",)
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(None, ["unet.stepz=3"])
    with pytest.raises(ValueError, match="unet.steps"):
        load_config(None, ["unet.steps=many"])
    with pytest.raises(ValueError, match="prediction_type"):
        load_config(None, ["unet.prediction_type=x0"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["unet.steps"])


def test_imagefolder_metadata_and_sidecars(tmp_path):
    write_imagefolder(tmp_path / "meta", 5, seed=3, size=48)
    data = read_imagefolder(tmp_path / "meta", 32)
    assert data.images.shape == (5, 3, 32, 32) and data.images.dtype == torch.uint8
    lines = [json.loads(x) for x in (tmp_path / "meta/metadata.jsonl").read_text().splitlines()]
    assert data.captions == [x["text"] for x in lines]
    side = tmp_path / "side"
    side.mkdir()
    for x in lines[:3]:
        shutil.copy(tmp_path / "meta" / x["file_name"], side / x["file_name"])
        (side / x["file_name"]).with_suffix(".txt").write_text(x["text"] + "\n")
    assert read_imagefolder(side, 32).captions == [x["text"] for x in lines[:3]]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no captioned images"):
        read_imagefolder(empty, 32)


def test_batches_are_a_pure_function_of_seed_and_step():
    a = runtime.batch_indices(10, 4, 7, seed=0)
    assert torch.equal(a, runtime.batch_indices(10, 4, 7, seed=0))
    assert not torch.equal(a, runtime.batch_indices(10, 4, 7, seed=1))
    epoch = torch.cat([runtime.batch_indices(12, 4, s, seed=0) for s in range(3)])
    assert sorted(epoch.tolist()) == list(range(12))       # one epoch = a permutation


def test_refuses_a_launch_that_got_fewer_processes():
    with pytest.raises(RuntimeError, match="--multi_gpu --num_processes 2"):
        runtime.check_processes(SimpleNamespace(num_processes=1), expected=2)
    runtime.check_processes(SimpleNamespace(num_processes=2), expected=2)


@pytest.mark.slow
def test_silent_single_process_launch_is_detected(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process; training must refuse it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_processes",
         "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
         "train", str(ROOT / "train/configs/default.yaml"), f"output_dir={tmp_path}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode != 0
    assert "2 processes were asked for but 1 started" in proc.stderr


@pytest.mark.slow
def test_two_processes_match_one_at_the_same_global_batch(straight, tmp_path):
    model, out = straight
    results = {}
    for n in (1, 2):
        run = tmp_path / f"p{n}"
        for stage in ("clip", "vae", "cache"):
            shutil.copytree(out / stage, run / stage)
        args = TOY + [f"output_dir={run}", f"model_dir={run / 'model'}", "save_dtype=fp32",
                      "stages=[unet]", f"num_processes={n}"]
        launch = ["--multi_gpu"] if n == 2 else []
        env = dict(os.environ, ACCELERATE_USE_CPU="1", PYTHONPATH=str(ROOT))
        subprocess.run([str(Path(sys.executable).parent / "accelerate"), "launch", *launch,
                        "--num_processes", str(n), "--num_machines", "1", "--mixed_precision",
                        "no", "--dynamo_backend", "no", "-m", "train",
                        str(ROOT / "train/configs/default.yaml"), *args],
                       check=True, env=env, cwd=ROOT, timeout=900)
        results[n] = weights(run / "model")
    # DDP sums gradients in another order (and accelerate's launch sets OMP_NUM_THREADS=1, which
    # changes the order inside each process too); Adam's m / sqrt(v) turns float noise on
    # near-zero gradients into sign-sensitive updates of up to one learning rate (5e-4). So the
    # typical parameter must agree to float precision (a real divergence moves parameters by ~lr),
    # and no parameter may differ by half a step.
    for a, b in ((results[2], results[1]), (results[1], weights(model))):
        diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in b])
        assert diffs.mean().item() < 1e-6, diffs.mean().item()      # 0.2 % of a step
        assert diffs.max().item() < 0.5 * 5e-4, diffs.max().item()
