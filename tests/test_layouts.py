"""Files written by today's transformers and diffusers load and convert (issue 9, defect 12).

transformers 5 saves ``CLIPTextModel`` without the ``text_model.`` level in its weight names, and a
tokenizer as ``tokenizer.json`` + ``tokenizer_config.json`` only. diffusers'
``scripts/convert_diffusers_to_original_stable_diffusion.py`` turns an SD-1 folder into a single
file by prefixing the text encoder's state dict, as it is on disk, with
``cond_stage_model.transformer.``; on such a folder that gives ``...transformer.embeddings.*`` /
``encoder.*`` / ``final_layer_norm.*``, the layout of older community SD-1 checkpoints too. The
folders here come from the installed transformers' own ``save_pretrained`` and diffusers' own
pipeline ``save_pretrained``; the single files re-state what the script writes (its UNet and VAE
names are the LDM ones, which ``test_convert`` checks against diffusers' own reader).
"""

import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_engine.components import load_model
from ldm_engine.configs import SD2
from ldm_engine.convert import convert, load_state
from ldm_engine.convert.detect import check_supported, infer_architecture
from ldm_engine.convert.errors import CheckpointError
from ldm_engine.convert.folder import read_folder
from ldm_engine.convert.keys_unet import unet_to_ldm
from ldm_engine.convert.keys_vae import vae_to_ldm
from ldm_engine.convert.ldm_layout import state_from_ldm, state_to_ldm
from ldm_engine.errors import ModelFolderError
from ldm_engine.inspection import format_report, inspect_path
from ldm_engine.tokenizer import SDTokenizer
from pipelines import TextToImage

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
SCRIPT_PREFIX = "cond_stage_model.transformer."
PROMPTS = ["a red cube", "Tom &amp; Jerry!!!", "富士山 🐶", "a " * 80]
GENERATE = dict(num_inference_steps=2, guidance_scale=5.0, height=32, width=32, seed=5,
                progress=False)


def _transformers_folder(tiny_dir: Path, components, dest: Path) -> Path:
    """tiny_dir with text_encoder/ and tokenizer/ written by transformers' save_pretrained."""
    shutil.copytree(tiny_dir, dest)
    for sub in ("text_encoder", "tokenizer"):
        shutil.rmtree(dest / sub)
    components.text_encoder.save_pretrained(dest / "text_encoder")
    components.tokenizer.hf.save_pretrained(dest / "tokenizer")
    return dest


def _diffusers_folder(components, dest: Path) -> Path:
    """The whole folder written by diffusers' StableDiffusionPipeline.save_pretrained."""
    scheduler = DDIMScheduler.from_config(components.schedule.to_dict("DDIMScheduler"))
    pipe = StableDiffusionPipeline(vae=components.vae, text_encoder=components.text_encoder,
                                   tokenizer=components.tokenizer.hf, unet=components.unet,
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def hf_dirs(tiny_dir, tiny_components, tmp_path_factory):
    root = tmp_path_factory.mktemp("today")
    return {"transformers": _transformers_folder(tiny_dir, tiny_components, root / "hf"),
            "diffusers": _diffusers_folder(tiny_components, root / "pipe")}


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Our own save of the same networks, as a pipeline."""
    return TextToImage.from_folder(tiny_dir)


def _text_keys(folder: Path) -> list[str]:
    return list(safetensors.torch.load_file(str(folder / "text_encoder/model.safetensors")))


@pytest.mark.skipif(not TRANSFORMERS_5, reason="the layout transformers 5 writes")
@pytest.mark.parametrize("writer", ["transformers", "diffusers"])
def test_todays_writers_drop_vocab_json_and_the_text_model_prefix(writer, hf_dirs):
    folder = hf_dirs[writer]
    assert sorted(p.name for p in (folder / "tokenizer").iterdir()) == \
        ["tokenizer.json", "tokenizer_config.json"]
    keys = _text_keys(folder)
    assert "encoder.layers.0.mlp.fc1.weight" in keys
    assert not any(k.startswith("text_model.") for k in keys)


@pytest.mark.parametrize("writer", ["transformers", "diffusers"])
def test_folder_from_todays_writers_loads_the_same_model(writer, hf_dirs, tiny_dir, reference):
    ours, theirs = load_model(tiny_dir), load_model(hf_dirs[writer])
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
        assert sorted(a) == sorted(b), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert (theirs.tokenizer.pad_id, theirs.tokenizer.max_length) == \
        (ours.tokenizer.pad_id, ours.tokenizer.max_length)
    with pytest.warns(UserWarning, match="truncated"):
        assert torch.equal(theirs.tokenizer(PROMPTS), ours.tokenizer(PROMPTS))
    image = TextToImage.from_folder(hf_dirs[writer])("a red cube", **GENERATE)
    assert torch.equal(image.pixels, reference("a red cube", **GENERATE).pixels)


def test_folder_from_transformers_converts_both_ways(hf_dirs, tiny_dir, tmp_path):
    convert(hf_dirs["transformers"], tmp_path / "model.safetensors")
    convert(tmp_path / "model.safetensors", tmp_path / "back")
    convert(tiny_dir, tmp_path / "ours.safetensors")
    a = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "ours.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert_same_weights(read_folder(tmp_path / "back"), read_folder(tiny_dir))


def test_converting_keeps_the_padding_tokenizer_json_names(hf_dirs, tmp_path):
    """A tokenizer.json-only folder that pads with "!" (SD-2 style) keeps that padding: it is
    read from tokenizer_config.json, not from a special_tokens_map.json the folder lacks."""
    folder = tmp_path / "zero"
    shutil.copytree(hf_dirs["transformers"], folder)
    shutil.rmtree(folder / "tokenizer")
    SDTokenizer.from_bpe("zero").hf.save_pretrained(folder / "tokenizer")
    convert(folder, tmp_path / "zero.safetensors")
    assert load_state(tmp_path / "zero.safetensors").tokenizer_pad == "zero"
    convert(tmp_path / "zero.safetensors", tmp_path / "back")
    assert SDTokenizer.from_folder(tmp_path / "back/tokenizer").pad_id == 0


def assert_same_weights(a, b) -> None:
    for name in ("unet", "vae", "text_encoder"):
        wa, wb = getattr(a, name), getattr(b, name)
        assert sorted(wa) == sorted(wb), name
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


# --- the unprefixed single-file layout -----------------------------------------------------------

def _script_single_file(folder: Path, dest: Path, extra: dict | None = None) -> dict:
    """What convert_diffusers_to_original_stable_diffusion.py writes for an SD-1 folder."""
    state = read_folder(folder)
    tensors = {**unet_to_ldm(state.unet, state.unet_config),
               **vae_to_ldm(state.vae, state.vae_config)}
    text = safetensors.torch.load_file(str(folder / "text_encoder/model.safetensors"))
    tensors |= {SCRIPT_PREFIX + k: v for k, v in text.items()} | (extra or {})
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if dest.suffix == ".ckpt":
        torch.save({"state_dict": tensors}, dest)          # the script's default output
    else:
        safetensors.torch.save_file(tensors, str(dest))    # its --use_safetensors output
    return tensors


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_unprefixed_single_file_converts_and_round_trips(suffix, hf_dirs, tiny_dir, reference,
                                                        tmp_path):
    source = tmp_path / f"script{suffix}"
    written = _script_single_file(hf_dirs["transformers"], source)
    text_keys = [k for k in written if k.startswith("cond_stage_model.")]
    assert text_keys and not any(k.startswith(SCRIPT_PREFIX + "text_model.") for k in text_keys)

    report = convert(source, tmp_path / "folder")
    assert report.family == "tiny"
    assert_same_weights(read_folder(tmp_path / "folder"), read_folder(tiny_dir))
    kwargs = dict(GENERATE, seed=11)
    assert torch.equal(TextToImage.from_folder(tmp_path / "folder")("a cube", **kwargs).pixels,
                       reference("a cube", **kwargs).pixels)

    # Back to a single file: the same tensors, the text encoder's under the canonical names.
    convert(tmp_path / "folder", tmp_path / "again.safetensors")
    again = safetensors.torch.load_file(str(tmp_path / "again.safetensors"))
    canonical = {(SCRIPT_PREFIX + "text_model." + k.removeprefix(SCRIPT_PREFIX)
                  if k.startswith(SCRIPT_PREFIX) else k): v for k, v in written.items()}
    assert sorted(again) == sorted(canonical)
    assert all(torch.equal(again[k], canonical[k]) for k in again)
    assert "OpenAI CLIP (SD-1" in format_report(inspect_path(source))


def test_old_community_layout_with_position_ids(hf_dirs, tiny_dir, tmp_path):
    """Older SD-1 checkpoints also carry CLIP's position ids (a buffer transformers recomputes)."""
    source = tmp_path / "community.safetensors"
    _script_single_file(hf_dirs["transformers"], source, extra={
        SCRIPT_PREFIX + "embeddings.position_ids": torch.arange(77)[None]})
    report = convert(source, tmp_path / "out")
    assert any("position_ids" in note for note in report.notes)
    assert_same_weights(read_folder(tmp_path / "out"), read_folder(tiny_dir))


def test_a_tensor_in_both_spellings_is_refused(hf_dirs, tmp_path):
    source = tmp_path / "both.safetensors"
    written = _script_single_file(hf_dirs["transformers"], tmp_path / "plain.safetensors")
    key = SCRIPT_PREFIX + "final_layer_norm.weight"
    _script_single_file(hf_dirs["transformers"], source, extra={
        SCRIPT_PREFIX + "text_model.final_layer_norm.weight": written[key].clone()})
    with pytest.raises(CheckpointError, match="final_layer_norm.weight is there twice"):
        convert(source, tmp_path / "out")


def test_sd2_tower_under_clip_names_is_read_as_sd2():
    """The script tells SD-2 by a `text_model.`-prefixed key, so an SD-2 folder saved by
    transformers 5 comes out in the SD-1 layout. Exactly SD-2's shapes must still give SD-2's
    configs (the text tower's exact GELU is invisible in the weights) and an SD-2 file back."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD2.unet.to_diffusers())
        vae = AutoencoderKL(**SD2.vae.to_diffusers())
        text = CLIPTextModel(CLIPTextConfig(**SD2.text_encoder.to_transformers()))
    tensors = {**unet_to_ldm(unet.state_dict(), dict(unet.config)),
               **vae_to_ldm(vae.state_dict(), dict(vae.config)),
               **{SCRIPT_PREFIX + k: v for k, v in text.state_dict().items()}}
    assert check_supported(tensors, "sd2.ckpt") == "clip"
    arch = infer_architecture({k: tuple(v.shape) for k, v in tensors.items()}, "clip", "sd2.ckpt")
    assert arch.family == "sd2" and arch.text_encoder.hidden_act == "gelu"
    state = state_from_ldm(tensors, {}, {}, "sd2.ckpt")
    assert state.family == "sd2" and state.text_layout == "open_clip"
    written = state_to_ldm(state)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in written
    assert not any(k.startswith(SCRIPT_PREFIX) for k in written)


def test_text_encoder_missing_weights_is_refused_not_randomised(hf_dirs, tmp_path):
    """transformers fills a weight absent from the file with random values and only logs it."""
    folder = tmp_path / "model"
    shutil.copytree(hf_dirs["transformers"], folder)
    weights = folder / "text_encoder/model.safetensors"
    tensors = safetensors.torch.load_file(str(weights))
    del tensors["final_layer_norm.weight"]
    safetensors.torch.save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ModelFolderError, match="lacks 1 text-encoder weights, e.g. "
                       "final_layer_norm.weight"):
        load_model(folder)
