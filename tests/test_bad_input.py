"""Bad input over the Python API and in model configs: a UserInputError before any compute.

The pipeline's networks are booby-trapped in every test here, so a check that let a bad value
through to the first forward pass fails the test rather than only costing time.
"""

import json
import math

import pytest
import safetensors.torch
import torch
from transformers import CLIPTextConfig

import pipelines.base
from ldm_engine.apps.cli import main
from ldm_engine.components import build_random, check_model_folder, load_model
from ldm_engine.config_check import ConfigError, check_model_configs
from ldm_engine.configs import SD1, TINY
from ldm_engine.convert.errors import CheckpointError
from ldm_engine.convert.folder import read_folder
from ldm_engine.convert.ldm_layout import META, _digest, decode_metadata
from ldm_engine.errors import ModelFolderError, UserInputError
from ldm_engine.limits import (MAX_IMAGES, Memory, SizeLimitError, check_size, estimate_bytes)
from pipelines import TextToImage
from conftest import Trapped


@pytest.fixture(scope="module")
def pipe():
    return TextToImage(build_random(TINY, seed=1))


@pytest.fixture
def trapped(pipe, trap):
    """The pipeline with every network raising if called (conftest.trap)."""
    return trap(pipe)


API_ROWS = [
    ({"guidance_scale": "5"}, "guidance scale must be a finite number"),
    ({"guidance_scale": True}, "guidance scale must be a finite number"),
    ({"guidance_scale": math.inf}, "guidance scale must be a finite number"),
    ({"eta": "0"}, "eta must be a finite number"),
    ({"num_inference_steps": 2.0}, "steps must be a positive integer"),
    ({"num_inference_steps": True}, "steps must be a positive integer"),
    ({"num_inference_steps": "2"}, "steps must be a positive integer"),
    ({"num_inference_steps": 1001}, "more than the model's 1000 training timesteps"),
    ({"num_inference_steps": 100000}, "more than the model's 1000 training timesteps"),
    ({"height": True}, "height must be a positive integer"),
    ({"width": 64.0}, "width must be a positive integer"),
    ({"height": 2147483648}, "native size"),
    ({"width": 100000}, "native size"),
    ({"num_images_per_prompt": True}, "num_images_per_prompt must be a positive integer"),
    ({"num_images_per_prompt": 1.0}, "num_images_per_prompt must be a positive integer"),
    ({"num_images_per_prompt": 1000000}, "1000000 images in one call"),
    ({"seed": 2**64}, "too large"),
    ({"seed": 2**64 - 1, "num_images_per_prompt": 2}, "too large"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"seed": True}, "seed must be a non-negative integer"),
    ({"seed": 1.5}, "seed must be a non-negative integer"),
    ({"sampler": 5}, "unknown sampler"),
    ({"sampler": ["ddim"]}, "unknown sampler"),
    ({"generator": 5}, "generator must be a torch.Generator"),
    ({"negative_prompt": 5}, "negative prompt must be a string or a list of strings"),
    ({"negative_prompt": "a\0b"}, "NUL"),
    ({"allow_large": "yes"}, "allow_large must be True or False"),
]


@pytest.mark.parametrize("kwargs,message", API_ROWS, ids=[str(r[0])[:40] for r in API_ROWS])
def test_wrong_values_and_types(trapped, kwargs, message):
    with pytest.raises(UserInputError, match=message.replace("(", r"\(")):
        trapped("a red circle", num_inference_steps=kwargs.pop("num_inference_steps", 2),
                **kwargs)


@pytest.mark.parametrize("prompt,message", [
    (5, "prompt must be a string or a list of strings, got int"),
    (None, "prompt must be a string or a list of strings, got NoneType"),
    (b"bytes", "got bytes"),
    (["ok", 5], "every prompt must be a string"),
    ("lone \udcff", "lone surrogate"),
    ("nul \0", "NUL"),
])
def test_wrong_prompts(trapped, prompt, message):
    with pytest.raises(UserInputError, match=message):
        trapped(prompt, num_inference_steps=2)


def test_numpy_scalars_are_numbers(pipe):
    np = pytest.importorskip("numpy")
    out = pipe("a", num_inference_steps=np.int64(1), guidance_scale=np.float64(2.0),
               seed=np.int64(3), height=np.int64(64), width=64, progress=False)
    assert out.params[0].seed == 3


def _memory(monkeypatch, available: int, total: int) -> None:
    monkeypatch.setattr(pipelines.base, "device_memory",
                        lambda device: Memory(available=available, total=total, where="RAM"))


def test_memory_estimate_refuses_before_compute(trapped, monkeypatch):
    _memory(monkeypatch, available=10_000, total=10**12)
    with pytest.raises(SizeLimitError, match="free now"):
        trapped("a", num_inference_steps=1, height=64, width=64)
    # allow_large compares with the total memory instead: this one gets as far as the networks.
    with pytest.raises(Trapped):
        trapped("a", num_inference_steps=1, height=64, width=64, allow_large=True)
    # ... unless even the total is too small.
    _memory(monkeypatch, available=10_000, total=10_000)
    with pytest.raises(SizeLimitError, match="this machine has"):
        trapped("a", num_inference_steps=1, height=64, width=64, allow_large=True)


def test_allow_large_lifts_the_size_limits(trapped):
    with pytest.raises(SizeLimitError):
        trapped("a", num_inference_steps=1, height=64, width=576)
    with pytest.raises(Trapped):                 # past every check: the text encoder runs
        trapped("a", num_inference_steps=1, height=64, width=576, allow_large=True)


def test_size_limits_follow_the_native_size():
    sd1 = check_model_configs(SD1.unet.to_diffusers(), SD1.vae.to_diffusers(),
                              CLIPTextConfig(**SD1.text_encoder.to_transformers()).to_dict())
    assert sd1.native_side == 512
    check_size(sd1, height=4096, width=512, num_images=1)            # 8x side, 8x area
    check_size(sd1, height=2048, width=2048, num_images=MAX_IMAGES)  # 16x area
    for h, w, n in ((4104, 512, 1), (2048, 2056, 1), (512, 512, MAX_IMAGES + 1)):
        with pytest.raises(SizeLimitError):
            check_size(sd1, height=h, width=w, num_images=n)
        check_size(sd1, height=h, width=w, num_images=n, allow_large=True)


def test_memory_estimate_scales_with_the_request():
    tiny = build_random(TINY).shape
    one = estimate_bytes(tiny, height=64, width=64, num_images=1, guided=True, dtype_bytes=4,
                         vae_dtype_bytes=4)
    assert estimate_bytes(tiny, height=64, width=64, num_images=2, guided=True, dtype_bytes=4,
                          vae_dtype_bytes=4) == 2 * one
    assert estimate_bytes(tiny, height=128, width=128, num_images=1, guided=True, dtype_bytes=4,
                          vae_dtype_bytes=4) == 4 * one
    tiled = estimate_bytes(tiny, height=512, width=512, num_images=1, guided=True,
                           dtype_bytes=4, vae_dtype_bytes=4, vae_tile=64)
    assert tiled < estimate_bytes(tiny, height=512, width=512, num_images=1, guided=True,
                                  dtype_bytes=4, vae_dtype_bytes=4)


def test_unet_of_unknown_input_channels_is_refused(monkeypatch, trapped):
    # 4 latent channels, or 4 + mask + 4 masked-image channels (inpainting UNets: they run text
    # to image on an all-repaint mask, tests/test_inpaint.py); 7 is neither.
    from diffusers.configuration_utils import FrozenDict

    unet = trapped.components.unet
    monkeypatch.setattr(unet, "_internal_dict", FrozenDict({**unet.config, "in_channels": 7}))
    with pytest.raises(UserInputError, match="reads 7 channels"):
        trapped("a", num_inference_steps=1)


# --- configs ------------------------------------------------------------------------------------

def _tiny_configs():
    return (TINY.unet.to_diffusers(), TINY.vae.to_diffusers(),
            CLIPTextConfig(**TINY.text_encoder.to_transformers()).to_dict())


CONFIG_ROWS = [
    ("vae", {"block_out_channels": None}, "vae config: block_out_channels=None is invalid"),
    ("vae", {"block_out_channels": 64}, "block_out_channels=64 is invalid"),
    ("vae", {"block_out_channels": []}, "block_out_channels=[] is invalid"),
    ("vae", {"block_out_channels": [32, 32.0]}, "block_out_channels=[32, 32.0] is invalid"),
    ("vae", {"layers_per_block": True}, "layers_per_block=True is invalid"),
    ("vae", {"latent_channels": 0}, "latent_channels=0 is invalid"),
    ("vae", {"scaling_factor": "0.18"}, "scaling_factor='0.18' is invalid"),
    ("vae", {"scaling_factor": math.nan}, "scaling_factor=nan is invalid"),
    ("vae", {"norm_num_groups": 5}, "norm_num_groups=5 is invalid"),
    ("vae", {"down_block_types": ["DownEncoderBlock2D"]}, "down_block_types"),
    ("unet", {"block_out_channels": "abc"}, "unet config: block_out_channels='abc' is invalid"),
    ("unet", {"block_out_channels": [32, 10**9]}, "is invalid"),
    ("unet", {"sample_size": 0}, "sample_size=0 is invalid"),
    ("unet", {"sample_size": 8.0}, "sample_size=8.0 is invalid"),
    ("unet", {"layers_per_block": [1, 1, 1]}, "layers_per_block=[1, 1, 1] is invalid"),
    ("unet", {"attention_head_dim": 0}, "attention_head_dim=0 is invalid"),
    ("unet", {"attention_head_dim": 64}, "64 attention heads at level 0 exceed its 32 channels"),
    ("unet", {"cross_attention_dim": 48}, "does not match the text encoder's hidden_size=32"),
    ("unet", {"out_channels": 3}, "does not match the VAE's latent_channels=4"),
    ("unet", {"norm_num_groups": 0}, "norm_num_groups=0 is invalid"),
    ("unet", {"up_block_types": "UpBlock2D"}, "up_block_types='UpBlock2D' is invalid"),
    ("text_encoder", {"hidden_size": -1}, "text encoder config: hidden_size=-1 is invalid"),
    ("text_encoder", {"hidden_size": None}, "hidden_size=None is invalid"),
    ("text_encoder", {"num_attention_heads": 5}, "it must divide hidden_size=32"),
    ("text_encoder", {"num_hidden_layers": 0}, "num_hidden_layers=0 is invalid"),
    ("text_encoder", {"vocab_size": 1000}, "vocab_size=1000 is invalid"),
    ("text_encoder", {"max_position_embeddings": 76}, "max_position_embeddings=76 is invalid"),
    ("text_encoder", {"layer_norm_eps": -1e-5}, "layer_norm_eps=-1e-05 is invalid"),
    ("text_encoder", {"eos_token_id": 10**6}, "eos_token_id=1000000 is invalid"),
]


@pytest.mark.parametrize("net,change,message", CONFIG_ROWS,
                         ids=[f"{r[0]}-{list(r[1])[0]}-{r[1][list(r[1])[0]]!r}"[:50]
                              for r in CONFIG_ROWS])
def test_config_validator(net, change, message):
    unet, vae, text = _tiny_configs()
    {"unet": unet, "vae": vae, "text_encoder": text}[net].update(change)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        check_model_configs(unet, vae, text)


def test_config_validator_accepts_every_family():
    from ldm_engine.configs import FAMILIES

    for family in FAMILIES.values():
        shape = check_model_configs(family.unet.to_diffusers(), family.vae.to_diffusers(),
                                    CLIPTextConfig(**family.text_encoder.to_transformers())
                                    .to_dict())
        assert shape.vae_factor == family.vae_factor


def _broken_folder(tiny_dir, tmp_path, rel, **changes):
    import os
    import shutil

    root = tmp_path / "model"
    shutil.copytree(tiny_dir, root, copy_function=os.symlink)
    cfg = json.loads((root / rel).read_text())
    cfg.update(changes)
    (root / rel).unlink()
    (root / rel).write_text(json.dumps(cfg))
    return root


@pytest.mark.parametrize("load", [check_model_folder, load_model, read_folder,
                                  TextToImage.from_folder])
def test_every_folder_reader_validates_configs(tiny_dir, tmp_path, load):
    root = _broken_folder(tiny_dir, tmp_path, "vae/config.json", block_out_channels=64)
    with pytest.raises(ModelFolderError, match="block_out_channels=64 is invalid"):
        load(root)


def _metadata(**changes):
    unet, vae, text = _tiny_configs()
    unet.update(changes)
    meta = {META + "family": "tiny", META + "text_layout": "clip", META + "tokenizer_pad": "eos",
            META + "unet_config": json.dumps(unet), META + "vae_config": json.dumps(vae),
            META + "text_config": json.dumps(text),
            META + "scheduler_config": json.dumps(TINY.schedule.to_dict("DDIMScheduler"))}
    # A matching digest: it only proves the metadata is what its writer meant.
    return {"format": "pt", **meta, META + "sha256": _digest(meta)}


def test_single_file_metadata_is_validated():
    assert decode_metadata(_metadata(), "x")["unet_config"]["sample_size"] == 8
    with pytest.raises(CheckpointError, match=r"damaged ldm_engine metadata \(unet_config: "
                                              r"block_out_channels=\[32.0, 64.0\] is invalid"):
        decode_metadata(_metadata(block_out_channels=[32.0, 64.0]), "x")


def test_convert_refuses_bad_single_file_metadata(tiny_dir, tmp_path, capsys):
    """A file `ldm convert` wrote, its metadata edited to float widths with a fresh digest."""
    single = tmp_path / "m.safetensors"
    assert main(["convert", str(tiny_dir), str(single)]) == 0
    tensors = safetensors.torch.load_file(str(single))
    with safetensors.safe_open(str(single), "pt") as f:
        meta = dict(f.metadata())
    unet = json.loads(meta[META + "unet_config"])
    unet["layers_per_block"] = 1.0
    meta[META + "unet_config"] = json.dumps(unet)
    meta[META + "sha256"] = _digest(meta)
    single.unlink()
    safetensors.torch.save_file(tensors, str(single), metadata=meta)
    capsys.readouterr()
    assert main(["convert", str(single), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "layers_per_block=1.0 is invalid" in err
    assert not (tmp_path / "out").exists()


def test_seed_range_matches_torch():
    """2**64 - 1 is the largest seed torch takes: allowed for one image."""
    torch.Generator().manual_seed(2**64 - 1)
    gens, seeds = pipelines.base.make_generators(1, 2**64 - 1, None)
    assert seeds == [2**64 - 1]
