"""Checkpoint conversion: round trips, an independent reader (diffusers), generation, options, CLI.

Fast tests use the `tiny` family (SD-1 shaped) and a test-only SD-2-shaped family at toy widths
(linear projections, per-level head counts, GELU OpenCLIP text tower with fused in_proj). The
real SD-1.x/SD-2.x sizes run under `-m slow`.
"""

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ldm_engine.apps.cli import BUNDLED_MODEL, main
from ldm_engine.components import build_random, load_model, save_model
from ldm_engine.configs import SD1, SD2, TINY, ModelFamily, TextEncoderConfig, UNetConfig
from ldm_engine.convert import convert, load_state
from ldm_engine.convert.errors import CheckpointError, UnsupportedModelError
from ldm_engine.convert.keys_unet import ema_key
from ldm_engine.errors import ModelFolderError, UserInputError
from ldm_engine.inspection import format_report, inspect_path
from pipelines import TextToImage
from schedulers import ScheduleConfig

# SD-2's features at toy widths. Widths are multiples of 64 and heads 64 wide, SD-2's own
# convention, so a file of this shape without our metadata is inferred exactly (see detect.py).
TINY_SD2 = ModelFamily(
    name="tiny-sd2",  # type: ignore[arg-type]  (test-only; deliberately not in FAMILIES)
    unet=UNetConfig(sample_size=8, block_out_channels=(64, 128), layers_per_block=1,
                    cross_attention_dim=64, attention_head_dim=(1, 2), use_linear_projection=True,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    vae=TINY.vae,
    text_encoder=TextEncoderConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=1, hidden_act="gelu", projection_dim=64,
                                   pad_token_id=0),
    schedule=ScheduleConfig(prediction_type="v_prediction"),
    tokenizer_pad="zero",
)


# --- helpers -------------------------------------------------------------------------------------

def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def folder_tensors(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for name, rel in (("unet", "unet/diffusion_pytorch_model.safetensors"),
                      ("vae", "vae/diffusion_pytorch_model.safetensors"),
                      ("text_encoder", "text_encoder/model.safetensors")):
        weights = safetensors.torch.load_file(str(root / rel))
        out[name] = {k.removeprefix("text_model."): v for k, v in weights.items()}
    return out


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key].reshape(-1).view(torch.uint8), b[key].reshape(-1).view(torch.uint8)), key


def assert_folders_equal(a: Path, b: Path) -> None:
    ta, tb = folder_tensors(a), folder_tensors(b)
    for name in ta:
        assert_bitwise_equal(ta[name], tb[name])


def strip_metadata(src: Path, dst: Path, extra: dict | None = None) -> Path:
    """The same tensors with no ldm_engine metadata: how a file from another tool looks."""
    tensors = read_tensors(src) | (extra or {})
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst),
                                metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-sd2"
    save_model(build_random(TINY_SD2, seed=1), path)
    return path


@pytest.fixture(scope="module")
def tiny_file(tiny_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("files") / "tiny.safetensors"
    convert(tiny_dir, path)
    return path


@pytest.fixture(scope="module")
def sd2_file(sd2_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("files") / "tiny-sd2.safetensors"
    convert(sd2_dir, path)
    return path


# --- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("which", ["tiny", "sd2"])
def test_single_file_diffusers_single_file_is_bit_identical(which, suffix, tiny_dir, sd2_dir, tmp_path):
    source = tiny_dir if which == "tiny" else sd2_dir
    first = tmp_path / f"first{suffix}"
    convert(source, first)                     # our writer builds the single file we start from
    convert(first, tmp_path / "folder")
    second = tmp_path / f"second{suffix}"
    convert(tmp_path / "folder", second)
    assert_bitwise_equal(read_tensors(first), read_tensors(second))
    # And the folder in the middle holds exactly the source's weights.
    assert_folders_equal(source, tmp_path / "folder")
    if suffix == ".safetensors":
        with safetensors.safe_open(str(first), "pt") as f1, safetensors.safe_open(str(second), "pt") as f2:
            assert f1.metadata() == f2.metadata()


def test_layouts_in_the_single_file(tiny_file, sd2_file):
    sd1 = read_tensors(tiny_file)
    assert "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight" in sd1
    assert sd1["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (32, 32, 1, 1)
    # VAE mid attention: 1x1 conv weights in the LDM layout, Linear in diffusers.
    assert sd1["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert sd1["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    # Decoder levels are numbered by resolution: diffusers' up_blocks.0 is LDM's up.3.
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in sd1
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in sd1

    sd2 = read_tensors(sd2_file)
    fused = sd2["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"]
    assert fused.shape == (3 * 64, 64)
    assert sd2["cond_stage_model.model.positional_embedding"].shape == (77, 64)
    assert sd2["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (64, 64)
    assert not any(k.startswith("cond_stage_model.model.transformer.resblocks.2.") for k in sd2)
    assert "cond_stage_model.model.text_projection" not in sd2
    # The fused projection is q, k, v stacked in that order.
    state = load_state(sd2_file)
    q, k, v = (state.text_encoder[f"encoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(fused, torch.cat([q, k, v]))


# --- an independent reader: diffusers' own single-file loader ------------------------------------

@pytest.mark.parametrize("which", ["tiny", "sd2"])
def test_diffusers_from_single_file_reads_our_output(which, tiny_dir, sd2_dir, tiny_file, sd2_file):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    folder, path = (tiny_dir, tiny_file) if which == "tiny" else (sd2_dir, sd2_file)
    source = load_model(folder)
    offline = dict(config=str(folder), local_files_only=True)
    unet = UNet2DConditionModel.from_single_file(str(path), subfolder="unet", **offline).eval()
    vae = AutoencoderKL.from_single_file(str(path), subfolder="vae", **offline).eval()
    pipe = StableDiffusionPipeline.from_single_file(str(path), safety_checker=None, **offline)
    text = pipe.text_encoder.eval()

    # The weights diffusers built are ours, bit for bit ...
    for theirs, ours in ((unet, source.unet), (pipe.unet, source.unet), (vae, source.vae),
                         (pipe.vae, source.vae), (text, source.text_encoder)):
        assert_bitwise_equal(theirs.state_dict(), ours.state_dict())
    # ... and so are the outputs, up to float32 rounding: with identical weights and inputs, CPU
    # kernels still pick their summation order by where a tensor sits in memory (measured: 1e-6
    # differences between two from_pretrained copies of one folder loaded differently).
    close = dict(rtol=1e-4, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    states = torch.randn(1, 77, source.text_encoder.config.hidden_size, generator=g)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    ids = source.tokenizer(["a photo of a cat"])
    with torch.no_grad():
        for theirs in (unet, pipe.unet):
            torch.testing.assert_close(theirs(latents, 10, states).sample,
                                       source.unet(latents, 10, states).sample, **close)
        for theirs in (vae, pipe.vae):
            torch.testing.assert_close(theirs.decode(latents).sample,
                                       source.vae.decode(latents).sample, **close)
            torch.testing.assert_close(theirs.encode(image).latent_dist.mean,
                                       source.vae.encode(image).latent_dist.mean, **close)
        torch.testing.assert_close(text(ids)[0], source.text_encoder(ids)[0], **close)


# --- generation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["tiny", "sd2"])
def test_converted_model_generates_the_same_image(which, tiny_dir, sd2_dir, tiny_file, sd2_file,
                                                  tmp_path):
    folder, path = (tiny_dir, tiny_file) if which == "tiny" else (sd2_dir, sd2_file)
    convert(path, tmp_path / "converted")
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0, height=64, width=64, seed=7,
                  progress=False)
    before = TextToImage.from_folder(folder)("a red cube", **kwargs)
    after = TextToImage.from_folder(tmp_path / "converted")("a red cube", **kwargs)
    assert torch.equal(before.pixels, after.pixels)
    assert load_model(tmp_path / "converted").schedule.prediction_type == \
        ("epsilon" if which == "tiny" else "v_prediction")


# --- files from other tools (no ldm_engine metadata) ---------------------------------------------

def test_foreign_sd1_shaped_file_is_recognised_by_shape(tiny_dir, tiny_file, tmp_path):
    foreign = strip_metadata(tiny_file, tmp_path / "foreign.safetensors", extra={
        # What older SD-1 files also carry: CLIP's position ids and LDM's schedule buffers.
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        "alphas_cumprod": torch.linspace(1, 0, 1000), "betas": torch.linspace(0, 1, 1000),
        # A VAE trained inside LDM leaves its loss's parameters beside it.
        "first_stage_model.loss.logvar": torch.zeros(())})
    report = convert(foreign, tmp_path / "out")
    assert report.family == "tiny" and report.prediction_type == "epsilon"
    assert any("position_ids" in n for n in report.notes)
    assert any("ignored 3 tensors" in n and "alphas_cumprod" in n for n in report.notes)
    assert_folders_equal(tiny_dir, tmp_path / "out")
    cfg = json.loads((tmp_path / "out/unet/config.json").read_text())
    assert cfg["attention_head_dim"] == TINY.unet.attention_head_dim


def test_foreign_sd2_file_with_the_full_openclip_tower(sd2_dir, sd2_file, tmp_path):
    """A real SD-2 file has a 24th OpenCLIP layer, text_projection and logit_scale; a diffusers
    folder has no place for them, so they are dropped and reported."""
    last = {k.replace("resblocks.1.", "resblocks.2."): v.clone() for k, v in read_tensors(sd2_file).items()
            if k.startswith("cond_stage_model.model.transformer.resblocks.1.")}
    foreign = strip_metadata(sd2_file, tmp_path / "sd2.safetensors", extra={
        **last, "cond_stage_model.model.text_projection": torch.randn(64, 64),
        "cond_stage_model.model.logit_scale": torch.tensor(4.6)})
    report = convert(foreign, tmp_path / "out")
    assert report.prediction_type == "v_prediction"
    assert any("assuming v_prediction" in n for n in report.notes)
    dropped = next(n for n in report.notes if n.startswith("dropped"))
    assert "resblocks.2." in dropped and "text_projection" in dropped and "logit_scale" in dropped
    assert_folders_equal(sd2_dir, tmp_path / "out")
    text_cfg = json.loads((tmp_path / "out/text_encoder/config.json").read_text())
    assert text_cfg["num_hidden_layers"] == 2 and text_cfg["hidden_act"] == "gelu"
    unet_cfg = json.loads((tmp_path / "out/unet/config.json").read_text())
    assert unet_cfg["attention_head_dim"] == [1, 2] and unet_cfg["use_linear_projection"]
    # Inferred configs are the source's where it matters: same outputs.
    kwargs = dict(num_inference_steps=2, height=64, width=64, seed=3, progress=False)
    assert torch.equal(TextToImage.from_folder(sd2_dir)("x", **kwargs).pixels,
                       TextToImage.from_folder(tmp_path / "out")("x", **kwargs).pixels)
    # inspect says what will be dropped.
    out = format_report(inspect_path(foreign))
    assert "text_projection" in out and "text encoder layout: OpenCLIP" in out


def test_prediction_type_override_and_sd2_base_global_step(sd2_file, tmp_path):
    foreign = strip_metadata(sd2_file, tmp_path / "f.safetensors")
    assert convert(foreign, tmp_path / "v").prediction_type == "v_prediction"
    assert convert(foreign, tmp_path / "eps", prediction="eps").prediction_type == "epsilon"
    sched = json.loads((tmp_path / "eps/scheduler/scheduler_config.json").read_text())
    assert sched["prediction_type"] == "epsilon"
    # The SD-2 512-base release is told apart by its training step.
    ckpt = tmp_path / "base.ckpt"
    torch.save({"state_dict": read_tensors(foreign), "global_step": 875000}, ckpt)
    report = convert(ckpt, tmp_path / "base")
    assert report.prediction_type == "epsilon" and any("512-base" in n for n in report.notes)
    # Folder -> file: --prediction is recorded in the file.
    convert(tmp_path / "v", tmp_path / "as-eps.safetensors", prediction="eps")
    assert load_state(tmp_path / "as-eps.safetensors").scheduler_config["prediction_type"] == "epsilon"


def test_edited_metadata_fails_its_checksum(tiny_dir, tiny_file, tmp_path):
    with safetensors.safe_open(str(tiny_file), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    scheduler = json.loads(meta["ldm_engine.scheduler_config"])
    edited = dict(meta, **{"ldm_engine.scheduler_config": json.dumps(
        dict(scheduler, prediction_type="v_prediction"), sort_keys=True)})
    path = tmp_path / "edited.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata=edited)
    with pytest.raises(CheckpointError, match="checksum"):
        convert(path, tmp_path / "out")
    # --family sets the metadata aside and infers the configs from the weights instead.
    assert convert(path, tmp_path / "out", family="tiny").prediction_type == "epsilon"
    assert_folders_equal(tiny_dir, tmp_path / "out")


def test_integer_weights_are_refused(tiny_file, tmp_path):
    """F32 -> I32 is a one-byte header change that keeps every size right."""
    tensors = read_tensors(tiny_file)
    key = "model.diffusion_model.out.2.bias"
    tensors[key] = tensors[key].view(torch.int32)
    path = strip_metadata(tiny_file, tmp_path / "int.safetensors", extra={key: tensors[key]})
    with pytest.raises(CheckpointError, match="dtype torch.int32"):
        convert(path, tmp_path / "out")


def test_family_flag_must_agree_with_the_text_layout(tiny_file, tmp_path):
    with pytest.raises(UnsupportedModelError, match="CLIP"):
        convert(tiny_file, tmp_path / "x", family="sd2")
    with pytest.raises(CheckpointError, match="does not match the architecture of family sd1"):
        convert(tiny_file, tmp_path / "x", family="sd1")      # sd1 depths vs tiny weights
    with pytest.raises(UserInputError, match="valid families"):
        convert(tiny_file, tmp_path / "x", family="sdxl")


def test_family_flag_for_a_folder_picks_the_text_layout(tiny_dir, sd2_dir, tmp_path):
    with pytest.raises(UserInputError, match="drop --family"):
        convert(tiny_dir, tmp_path / "x.safetensors", family="sd2")
    # A custom shape can be written in either layout, and reads back the same way.
    convert(sd2_dir, tmp_path / "clip.safetensors", family="sd1")
    weights = read_tensors(tmp_path / "clip.safetensors")
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in weights)
    convert(tmp_path / "clip.safetensors", tmp_path / "back")
    assert_folders_equal(sd2_dir, tmp_path / "back")


# --- EMA ------------------------------------------------------------------------------------------

def test_ema_weights(tiny_dir, tiny_file, tmp_path):
    live = read_tensors(tiny_file)
    ema = {ema_key(k): v + 1 for k, v in live.items() if k.startswith("model.diffusion_model.")}
    assert "model_ema.diffusion_modelinput_blocks00weight" in ema
    path = strip_metadata(tiny_file, tmp_path / "ema.safetensors", extra={
        **ema, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000)})

    report = convert(path, tmp_path / "live")                 # default: the live weights
    assert any("--ema" in n for n in report.notes)
    assert_folders_equal(tiny_dir, tmp_path / "live")
    convert(path, tmp_path / "ema", ema=True)
    got = folder_tensors(tmp_path / "ema")["unet"]
    want = folder_tensors(tiny_dir)["unet"]
    assert all(torch.equal(got[k], want[k] + 1) for k in want)

    out = format_report(inspect_path(path))
    assert "EMA weights: present" in out
    assert "EMA weights: none" in format_report(inspect_path(tiny_file))
    with pytest.raises(UserInputError, match="no EMA"):
        convert(tiny_file, tmp_path / "x", ema=True)
    incomplete = strip_metadata(path, tmp_path / "partial.safetensors")
    weights = read_tensors(incomplete)
    del weights["model_ema.diffusion_modelout2weight"]
    safetensors.torch.save_file(weights, str(incomplete))
    with pytest.raises(CheckpointError, match="EMA weights are incomplete"):
        convert(incomplete, tmp_path / "y", ema=True)


# --- inpainting, dtypes ---------------------------------------------------------------------------

def test_nine_channel_inpainting_unet(tmp_path):
    import dataclasses
    family = dataclasses.replace(TINY, unet=dataclasses.replace(TINY.unet, in_channels=9))
    save_model(build_random(family, seed=2), tmp_path / "inpaint")
    convert(tmp_path / "inpaint", tmp_path / "inpaint.safetensors")
    weights = read_tensors(tmp_path / "inpaint.safetensors")
    assert weights["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9
    foreign = strip_metadata(tmp_path / "inpaint.safetensors", tmp_path / "foreign.safetensors")
    assert inspect_path(foreign)["unet_in_channels"] == 9
    convert(foreign, tmp_path / "back")
    assert json.loads((tmp_path / "back/unet/config.json").read_text())["in_channels"] == 9
    assert json.loads((tmp_path / "back/model_index.json").read_text())["_class_name"] == \
        "StableDiffusionInpaintPipeline"
    assert_folders_equal(tmp_path / "inpaint", tmp_path / "back")


@pytest.mark.parametrize("dtype,torch_dtype,suffix", [("fp16", torch.float16, ".safetensors"),
                                                      ("bf16", torch.bfloat16, ".ckpt")])
def test_dtype_cast(dtype, torch_dtype, suffix, tiny_dir, tiny_file, tmp_path):
    out = tmp_path / f"half{suffix}"
    convert(tiny_file, out, dtype=dtype)
    source, half = read_tensors(tiny_file), read_tensors(out)
    assert all(v.dtype == torch_dtype for v in half.values())
    assert_bitwise_equal(half, {k: v.to(torch_dtype) for k, v in source.items()})
    convert(out, tmp_path / "folder")                        # dtype kept, not silently upcast
    assert all(v.dtype == torch_dtype for v in folder_tensors(tmp_path / "folder")["unet"].values())
    # The config names the dtype a default load gives, float32 like diffusers' networks, not the
    # weights' (see components.TEXT_CONFIG_DTYPE and tests/test_diffusers_load.py).
    assert json.loads((tmp_path / "folder/text_encoder/config.json").read_text())["dtype"] == \
        "float32"
    load_model(tmp_path / "folder")


# --- unsupported and wrong input ------------------------------------------------------------------

def test_unsupported_families_are_named(tiny_file, tmp_path):
    weights = read_tensors(tiny_file)
    sdxl = {k: v for k, v in weights.items() if not k.startswith("cond_stage_model.")}
    sdxl["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(3, 1)
    sdxl["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(1, 1)
    safetensors.torch.save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(UnsupportedModelError, match=r"SDXL.*conditioner\.embedders\.1"):
        convert(tmp_path / "sdxl.safetensors", tmp_path / "x")
    labelled = dict(weights, **{"model.diffusion_model.label_emb.0.0.weight": torch.zeros(1, 1)})
    safetensors.torch.save_file(labelled, str(tmp_path / "label.safetensors"))
    with pytest.raises(UnsupportedModelError, match="label_emb"):
        convert(tmp_path / "label.safetensors", tmp_path / "x")
    vae_only = {k: v for k, v in weights.items() if k.startswith("first_stage_model.")}
    safetensors.torch.save_file(vae_only, str(tmp_path / "vae.safetensors"))
    with pytest.raises(UnsupportedModelError, match="no UNet"):
        convert(tmp_path / "vae.safetensors", tmp_path / "x")
    # inspect describes what convert refuses, instead of failing.
    report = inspect_path(tmp_path / "sdxl.safetensors")
    assert report["family"] == "unsupported" and "SDXL" in report["notes"][0]


def test_destination_rules(tiny_dir, tiny_file, tmp_path):
    with pytest.raises(UserInputError, match="--overwrite"):
        convert(tiny_dir, tiny_file)
    with pytest.raises(UserInputError, match="single-file destination"):
        convert(tiny_dir, tmp_path / "model.bin", to="single-file")
    with pytest.raises(UserInputError, match="named like a file"):
        convert(tiny_file, tmp_path / "x.safetensors", to="diffusers")
    with pytest.raises(UserInputError, match="EMA"):
        convert(tiny_dir, tmp_path / "x.safetensors", ema=True)
    with pytest.raises(UserInputError, match="--dtype"):
        convert(tiny_dir, tmp_path / "x.safetensors", dtype="fp8")
    out = tmp_path / "again.safetensors"
    convert(tiny_dir, out)
    convert(tiny_dir, out, overwrite=True, dtype="fp16")
    assert next(iter(read_tensors(out).values())).dtype == torch.float16


def test_failed_write_leaves_destination_untouched(tiny_dir, tiny_file, tmp_path, monkeypatch):
    from ldm_engine.convert import single_file

    dest = tmp_path / "keep.safetensors"
    shutil.copy(tiny_file, dest)
    before = dest.read_bytes()
    real_save = single_file.safetensors.torch.save_file

    def corrupting_save(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        data = bytearray(Path(path).read_bytes())
        data[-1] ^= 0x01                                     # one flipped bit in the last tensor
        Path(path).write_bytes(bytes(data))

    monkeypatch.setattr(single_file.safetensors.torch, "save_file", corrupting_save)
    with pytest.raises(CheckpointError, match="reads back different"):
        convert(tiny_dir, dest, overwrite=True, dtype="fp16")
    assert dest.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]   # no temp left

    monkeypatch.undo()
    from ldm_engine.convert import folder
    monkeypatch.setattr(folder, "verify_tensors", lambda *a: (_ for _ in ()).throw(
        CheckpointError("simulated failure after writing")))
    shutil.copytree(tiny_dir, tmp_path / "model")
    snapshot = {p.relative_to(tmp_path / "model"): p.read_bytes()
                for p in (tmp_path / "model").rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="simulated"):
        convert(tiny_file, tmp_path / "model", overwrite=True, dtype="fp16")
    assert snapshot == {p.relative_to(tmp_path / "model"): p.read_bytes()
                        for p in (tmp_path / "model").rglob("*") if p.is_file()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors", "model"]


# --- CLI ------------------------------------------------------------------------------------------

def test_cli_convert_and_inspect(tiny_dir, tmp_path, capsys):
    out = tmp_path / "m.ckpt"
    assert main(["convert", str(tiny_dir), str(out), "--dtype", "fp16"]) == 0
    assert "ckpt file from diffusers folder" in capsys.readouterr().out
    assert main(["convert", str(out), str(tmp_path / "folder"), "--no-ema"]) == 0
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ckpt single file, family tiny, epsilon prediction" in text
    assert "F16" in text and "EMA weights: none" in text and "metadata ldm_engine.family: tiny" in text
    for name in ("unet", "vae", "text_encoder"):
        assert name in text
    # Errors: one line, exit status 2.
    assert main(["convert", str(out), str(tmp_path / "folder")]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert main(["convert", str(tiny_dir), str(tmp_path / "y"), "--family", "sd3"]) == 2
    assert "valid families" in capsys.readouterr().err


# --- the bundled model ----------------------------------------------------------------------------

@pytest.mark.skipif(not (BUNDLED_MODEL / "model_index.json").is_file(),
                    reason=f"no bundled model at {BUNDLED_MODEL} yet (built by `make train-default`)")
def test_bundled_model_round_trip(tmp_path):
    """The bundled VAE's own scaling_factor (0.99277) is folded into its quant convolutions in a
    single file (tests/test_latent_scale.py), so the folder comes back equivalent, not identical:
    those three fp16 tensors are re-rounded, everything else is bit for bit the source's."""
    convert(BUNDLED_MODEL, tmp_path / "a.safetensors")
    convert(tmp_path / "a.safetensors", tmp_path / "folder")
    convert(tmp_path / "folder", tmp_path / "b.safetensors")
    assert_bitwise_equal(read_tensors(tmp_path / "a.safetensors"), read_tensors(tmp_path / "b.safetensors"))
    source, back = folder_tensors(BUNDLED_MODEL), folder_tensors(tmp_path / "folder")
    folded = ("quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight")
    for name in source:
        keep = {k: v for k, v in source[name].items() if name != "vae" or k not in folded}
        assert_bitwise_equal(keep, {k: back[name][k] for k in keep})
    assert json.loads((tmp_path / "folder/vae/config.json").read_text())["scaling_factor"] == 0.18215
    # Same images: fp16 rounding of the folded weights moved pixels by 6.4e-5 at most (measured).
    kwargs = dict(num_inference_steps=10, guidance_scale=5.0, seed=0, progress=False)
    prompts = ["a yellow triangle in the centre, green background", "a red circle on the left"]
    before = TextToImage.from_folder(BUNDLED_MODEL)(prompts, **kwargs).pixels
    after = TextToImage.from_folder(tmp_path / "a.safetensors")(prompts, **kwargs).pixels
    assert (before - after).abs().max() <= 2e-4


# --- real sizes (minutes, tens of GB of disk) ----------------------------------------------------

def assert_safetensors_files_equal(a: Path, b: Path, strip: str = "") -> None:
    """Tensor by tensor, so two multi-GB files are never in memory at once."""
    with safetensors.safe_open(str(a), "pt") as fa, safetensors.safe_open(str(b), "pt") as fb:
        keys_a = {k.removeprefix(strip): k for k in fa.keys()}
        keys_b = {k.removeprefix(strip): k for k in fb.keys()}
        assert sorted(keys_a) == sorted(keys_b)
        for key in keys_a:
            assert_bitwise_equal({key: fa.get_tensor(keys_a[key])}, {key: fb.get_tensor(keys_b[key])})


def assert_folders_equal_streaming(a: Path, b: Path) -> None:
    for rel in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors"):
        assert_safetensors_files_equal(a / rel, b / rel, strip="text_model.")


@pytest.mark.slow
@pytest.mark.parametrize("family", [SD1, SD2], ids=["sd1", "sd2"])
def test_real_size_round_trip_and_diffusers_reader(family, tmp_path):
    try:
        _real_size_round_trip(family, tmp_path)
    finally:
        # pytest keeps the last runs' temporary folders; these hold ~10 GB each.
        shutil.rmtree(tmp_path, ignore_errors=True)


def _real_size_round_trip(family: ModelFamily, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    components = build_random(family, seed=0)
    save_model(components, tmp_path / "source")
    del components
    first = tmp_path / "first.safetensors"
    assert convert(tmp_path / "source", first).family == family.name
    convert(first, tmp_path / "folder")
    assert_folders_equal_streaming(tmp_path / "source", tmp_path / "folder")
    convert(tmp_path / "folder", tmp_path / "second.safetensors")
    shutil.rmtree(tmp_path / "folder")
    assert_safetensors_files_equal(first, tmp_path / "second.safetensors")
    (tmp_path / "second.safetensors").unlink()

    # A file without our metadata, as another tool writes it, is recognised by its shapes.
    foreign = tmp_path / "foreign.safetensors"
    with safetensors.safe_open(str(first), "pt") as f:
        safetensors.torch.save_file({k: f.get_tensor(k) for k in f.keys()}, str(foreign),
                                    metadata={"format": "pt"})
    assert inspect_path(foreign)["family"] == family.name
    report = convert(foreign, tmp_path / "from-foreign")
    assert report.family == family.name
    assert report.prediction_type == family.schedule.prediction_type
    assert_folders_equal_streaming(tmp_path / "source", tmp_path / "from-foreign")
    shutil.rmtree(tmp_path / "from-foreign")
    foreign.unlink()

    # diffusers' own converter reads our file at full size.
    unet = UNet2DConditionModel.from_single_file(str(first), config=str(tmp_path / "source"),
                                                 subfolder="unet", local_files_only=True)
    theirs = unet.state_dict()
    with safetensors.safe_open(str(tmp_path / "source/unet/diffusion_pytorch_model.safetensors"), "pt") as f:
        for key in f.keys():
            assert torch.equal(theirs[key], f.get_tensor(key)), key
