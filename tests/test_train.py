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
from train.__main__ import cli
from train.stage_unet import load_conditioning
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


def test_full_recipe_keeps_the_whole_clip(straight):
    """The model carries the clip stage's image tower and projections, in one space with the text
    encoder the UNet reads, and diffusers loads the towers as its optional components."""
    from diffusers import StableDiffusionPipeline

    from ldm_engine.clip import load_clip

    model, out = straight
    index = json.loads((model / "model_index.json").read_text())
    assert index["image_encoder"] == ["transformers", "CLIPVisionModelWithProjection"]
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    ours = load_clip(model)
    stage = load_clip(out / "clip")
    texts = ["a red circle on the left", "a blue square at the top"]
    assert torch.equal(ours.text_embeds(texts), stage.text_embeds(texts))
    ref = StableDiffusionPipeline.from_pretrained(model, local_files_only=True,
                                                  safety_checker=None)
    assert type(ref.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    # The text encoder the UNet reads is the CLIP's own text tower.
    text = safetensors.torch.load_file(str(model / "text_encoder/model.safetensors"))
    clip_text = safetensors.torch.load_file(str(out / "clip/text_encoder/model.safetensors"))
    assert text.keys() == clip_text.keys() and all(torch.equal(text[k], clip_text[k])
                                                   for k in text)


def test_hard_negatives_train_and_change_the_clip(straight, tmp_path):
    model, out = straight
    neg = main(toy_config(tmp_path, "stages=[clip]", "clip.hard_negatives=2"))
    assert neg == tmp_path / "model"
    a = safetensors.torch.load_file(str(out / "clip/text_encoder/model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "clip/text_encoder/model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_image_phase_trains_the_image_tower_only(straight, tmp_path):
    """clip.image_steps trains the image side against the frozen text tower: the text encoder the
    UNet reads is bit-identical to the run without the phase, the image tower is not."""
    _, out = straight
    main(toy_config(tmp_path, "stages=[clip]", "clip.image_steps=2"))

    def load(root, sub):
        name = "model.safetensors"
        return safetensors.torch.load_file(str(root / "clip" / sub / name))

    before, after = load(out, "text_encoder"), load(tmp_path, "text_encoder")
    assert all(torch.equal(before[k], after[k]) for k in before)
    before, after = load(out, "image_encoder"), load(tmp_path, "image_encoder")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_contrastive_loss_without_negatives_is_clips():
    """ContrastiveLoss with no negatives is transformers' CLIPModel loss (Radford et al.)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from train.stage_clip import ContrastiveLoss

    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   projection_dim=16, eos_token_id=49407).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       image_size=32, patch_size=8,
                                       projection_dim=16).to_dict(), projection_dim=16))
    ids = torch.randint(0, 49000, (6, 9))
    ids[:, -1] = 49407
    pixels = torch.randn(6, 3, 32, 32)
    want = clip(input_ids=ids, pixel_values=pixels, return_loss=True).loss
    got = ContrastiveLoss(clip)(ids, pixels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # A masked-out negative changes nothing; a real one can only raise the image-side loss.
    same = ContrastiveLoss(clip)(ids, pixels, ids.flip(0), torch.zeros(6, dtype=torch.bool))
    torch.testing.assert_close(same, want, rtol=1e-5, atol=1e-6)
    harder = ContrastiveLoss(clip)(ids, pixels, ids.flip(0), torch.ones(6, dtype=torch.bool))
    assert harder > want


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


BUNDLED = ROOT / "ldm_engine/models/default"


def test_default_config_writes_its_model_under_output_dir(tmp_path, monkeypatch, capsys):
    """The README's command must never replace the bundled model (only `make train-default`)."""
    monkeypatch.chdir(ROOT)             # the README runs it from the repo root
    default = ROOT / "train/configs/default.yaml"
    cfg = load_config(default, ["unet.steps=2000", "output_dir=runs/x"])
    assert cfg.model_path == Path("runs/x/model")
    assert load_config(default, [f"output_dir={tmp_path}"]).model_path == tmp_path / "model"
    # A config file naming the bundled folder is refused, relative or absolute; only the command
    # line may name it, as the Makefile does.
    for where in ("ldm_engine/models/default", str(BUNDLED), str(BUNDLED / "sub")):
        own = tmp_path / "own.yaml"
        own.write_text(default.read_text() + f"model_dir: {where}\n")
        with pytest.raises(ValueError, match="inside the bundled models"):
            load_config(own, [f"output_dir={tmp_path}"])
        assert cli([str(own)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "bundled models" in err and "Traceback" not in err
    explicit = load_config(default, ["model_dir=ldm_engine/models/default"])
    assert explicit.model_path.resolve() == BUNDLED
    assert "model_dir=ldm_engine/models/default" in (ROOT / "Makefile").read_text()


# Two steps of batch 2 on four 64 px scenes; warm-up 1 so the second step has the full rate.
FINE_TUNE = ["stages=[unet]", f"unet.init_from={BUNDLED}", "data.num_images=4",
             "unet.steps=2", "unet.batch_size=2", "unet.warmup_steps=1",
             "unet.mixed_precision=fp32", "checkpoint_every=0", "sample_every=0",
             "save_dtype=fp32"]


def _changed(before: dict, after: dict) -> bool:
    assert before.keys() == after.keys()
    return any(not torch.equal(before[k].float(), after[k]) for k in before)


@pytest.mark.parametrize("train_text", [False, True], ids=["unet", "unet+text"])
def test_fine_tune_from_the_bundled_model(tmp_path, train_text):
    extra = ["unet.train_text_encoder=true", "unet.cache=false"] if train_text else []
    cfg = load_config(ROOT / "train/configs/default.yaml",
                      FINE_TUNE + [f"output_dir={tmp_path}", *extra])
    assert cfg.model_path == tmp_path / "model"       # checked before anything is written
    text_file = "text_encoder/model.safetensors"
    vae_file = "vae/diffusion_pytorch_model.safetensors"
    original = {f: safetensors.torch.load_file(str(BUNDLED / f)) for f in (text_file, vae_file)}
    out = main(cfg)
    assert out == tmp_path / "model"
    assert _changed(weights(BUNDLED), weights(out))
    assert _changed(original[text_file],
                    safetensors.torch.load_file(str(out / text_file))) == train_text
    assert not _changed(original[vae_file], safetensors.torch.load_file(str(out / vae_file)))
    res = TextToImage.from_folder(out)("a red circle on the left", num_inference_steps=2,
                                       seed=0, progress=False)
    assert res.images[0].size == (64, 64) and torch.isfinite(res.pixels).all()


def test_fine_tune_at_another_resolution(tmp_path):
    """Noise is drawn at the training images' latent size, not the loaded UNet's native one."""
    cfg = load_config(ROOT / "train/configs/default.yaml",
                      FINE_TUNE + [f"output_dir={tmp_path}", "data.size=32"])
    assert _changed(weights(BUNDLED), weights(main(cfg)))


def test_fine_tune_keeps_the_objective_of_the_model_it_starts_from(tmp_path):
    """A v-prediction model (SD 2.x 768) fine-tuned without naming an objective stays v."""
    src = tmp_path / "v-model"
    shutil.copytree(BUNDLED, src)
    sched = src / "scheduler/scheduler_config.json"
    config = json.loads(sched.read_text()) | {"prediction_type": "v_prediction"}
    sched.write_text(json.dumps(config))
    base = [f"output_dir={tmp_path}", f"unet.init_from={src}"]
    cond = load_conditioning(load_config(None, base))
    assert cond.schedule.prediction_type == "v_prediction"
    cond = load_conditioning(load_config(None, base + ["unet.prediction_type=epsilon"]))
    assert cond.schedule.prediction_type == "epsilon"
    assert load_conditioning(load_config(None, [f"unet.init_from={BUNDLED}"])
                             ).schedule.prediction_type == "epsilon"


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
