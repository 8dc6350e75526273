"""The three networks, the tokenizer and the schedule of an SD-style model; build, load and save.

On disk a model is a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``; configs as JSON, weights as safetensors), so anything diffusers
saves loads here and what we save loads in diffusers. Nothing here ever contacts a model hub.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import diffusers
import safetensors.torch
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from schedulers import ScheduleConfig, load_schedule_config

from .config_check import (ModelShape, check_model_configs, check_scheduler_config,
                           read_config_file)
from .configs import FAMILIES, ModelFamily
from .errors import ModelFolderError
from .formats import check_safetensors, read_safetensors
from .fsutil import atomic_dir, restore_aside
from .tokenizer import SDTokenizer

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS = "text_encoder/model.safetensors"
# The `dtype` every text_encoder/config.json we write names, whatever the weights' dtype. Loaded
# with no dtype argument, transformers 5 takes the config's `dtype` ("auto"), else the weights'
# own; diffusers' networks load in float32. An fp16 folder whose config named float16 (as
# save_pretrained writes) therefore loaded in diffusers as an fp16 text encoder feeding an fp32
# UNet, and generation failed on the dtype mismatch. Naming float32 makes a plain
# `StableDiffusionPipeline.from_pretrained(folder)` load everything in float32 (fp16 weights are
# upcast exactly); an explicit torch_dtype still applies to all components alike.
TEXT_CONFIG_DTYPE = torch.float32
REQUIRED_FILES = (
    "model_index.json",
    "unet/config.json", UNET_WEIGHTS,
    "vae/config.json", VAE_WEIGHTS,
    "text_encoder/config.json", TEXT_WEIGHTS,
    "scheduler/scheduler_config.json",
)
NETWORK_CONFIGS = {"unet": "unet/config.json", "vae": "vae/config.json",
                   "text_encoder": "text_encoder/config.json"}


@dataclass
class Components:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: SDTokenizer
    schedule: ScheduleConfig

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        # The VAE's, not unet.in_channels: a 9-channel inpainting UNet reads 4 latent channels
        # plus a mask and masked-image latents.
        return self.vae.config.latent_channels

    @property
    def shape(self) -> ModelShape:
        """The networks' architecture as config_check sees it (for size and memory limits)."""
        return check_model_configs(dict(self.unet.config), dict(self.vae.config),
                                   self.text_encoder.config.to_dict())

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        # Only what is asked for: diffusers warns on any dtype argument, even None.
        args = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for net in (self.unet, self.vae, self.text_encoder):
            net.to(**args)
        return self

    def eval(self) -> "Components":
        for net in (self.unet, self.vae, self.text_encoder):
            net.eval().requires_grad_(False)
        return self


def build_random(family: ModelFamily, *, seed: int = 0) -> Components:
    """Randomly initialised networks of a family's architecture (float32, CPU, eval mode)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**family.unet.to_diffusers())
    vae = AutoencoderKL(**family.vae.to_diffusers())
    text_encoder = CLIPTextModel(CLIPTextConfig(**family.text_encoder.to_transformers()))
    tokenizer = SDTokenizer.from_bpe(pad=family.tokenizer_pad)
    return Components(unet, vae, text_encoder, tokenizer, family.schedule).eval()


def detect_family(unet_config: dict, text_config: dict) -> str:
    """The family whose architecture matches, or 'custom' (any other SD-style shape still loads)."""
    for fam in FAMILIES.values():
        want = fam.unet
        if (tuple(unet_config.get("block_out_channels", ())) == want.block_out_channels
                and unet_config.get("cross_attention_dim") == want.cross_attention_dim
                and text_config.get("hidden_size") == fam.text_encoder.hidden_size
                and text_config.get("num_hidden_layers") == fam.text_encoder.num_hidden_layers):
            return fam.name
    return "custom"


def _read_json(path: Path) -> dict:
    return read_config_file(path)


def _check_configs(root: Path) -> ModelShape:
    """Every config the loaders read, by type and range (config_check), before they read it."""
    configs = {name: _read_json(root / rel) for name, rel in NETWORK_CONFIGS.items()}
    shape = check_model_configs(configs["unet"], configs["vae"], configs["text_encoder"],
                                where={name: str(root / rel)
                                       for name, rel in NETWORK_CONFIGS.items()})
    scheduler = root / "scheduler/scheduler_config.json"
    scheduler_cfg = _read_json(scheduler)
    check_scheduler_config(scheduler_cfg, str(scheduler))
    try:
        ScheduleConfig.from_dict(scheduler_cfg)
    except ValueError as e:
        raise ModelFolderError(f"{scheduler}: {e}") from None
    return shape


def check_model_folder(path: str | os.PathLike) -> Path:
    """Fail before any loading if the folder is missing a file (naming the first one missing), or
    a weights file is malformed, or a config has a field of the wrong type or range."""
    root = Path(path)
    if not root.is_dir() and not restore_aside(root):  # a replace killed between two renames
        raise ModelFolderError(f"model folder not found: {root}")
    for rel in REQUIRED_FILES:
        if not (root / rel).is_file():
            hint = ""
            if rel.endswith(".safetensors") and any((root / rel).parent.glob("*.bin")):
                hint = " (only a .bin pickle is there: convert it with `ldm convert`)"
            raise ModelFolderError(f"incomplete model folder {root}: missing {rel}{hint}")
    for rel in (UNET_WEIGHTS, VAE_WEIGHTS, TEXT_WEIGHTS):
        check_safetensors(root / rel)
    _check_configs(root)
    return root


def model_shape_of(path: str | os.PathLike) -> ModelShape | None:
    """A folder's architecture from its validated configs, without loading any weights.

    None for a single file, whose configs are only known once it is converted (the pipeline
    checks a request against the loaded networks again before any compute).
    """
    if Path(path).is_file():
        return None
    root = check_model_folder(path)
    return _check_configs(root)          # (validated above; read again for the shape: 2 KB)


def _load_lean(cls, folder: Path, dtype: torch.dtype, channels_last: bool):
    """A diffusers network whose peak memory while loading is its own size in `dtype`.

    Built on the meta device (no throwaway random init), then given the file's tensors, cast one
    at a time as they are read. A folder whose keys do not match the class exactly (e.g. the old
    VAE attention names that diffusers renames on load) goes through diffusers' own loader.
    """
    state = read_safetensors(folder / "diffusion_pytorch_model.safetensors", dtype,
                             channels_last=channels_last)
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(folder))
    expected = set(model.state_dict())
    if set(state) != expected:
        del state, model
        return cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, channels_last: bool = False) -> Components:
    """Load a diffusers-layout SD folder from local disk (weights cast to dtype, eval mode).

    A file (.safetensors, .ckpt) is an SD-1.x/2.x single file, converted in memory as
    `ldm convert` reads it (convert.to_components). channels_last lays the UNet's and VAE's
    convolution weights out channels-last as they load.
    """
    if Path(path).is_file():
        from .convert.to_components import load_single_file   # convert builds on this module

        return load_single_file(path, device=device, dtype=dtype, channels_last=channels_last)
    root = check_model_folder(path)
    unet_cfg = _read_json(root / "unet/config.json")
    text_cfg = _read_json(root / "text_encoder/config.json")
    # transformers draws a bar per load; loading a local folder is quick and the bar is noise.
    transformers.utils.logging.disable_progress_bar()
    try:
        unet = _load_lean(UNet2DConditionModel, root / "unet", dtype, channels_last)
        vae = _load_lean(AutoencoderKL, root / "vae", dtype, channels_last)
        # Either key spelling loads: `text_model.*` (published folders, ours) or unprefixed
        # (transformers 5's save_pretrained).
        text_encoder, loading = CLIPTextModel.from_pretrained(
            root / "text_encoder", dtype=dtype, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelFolderError(f"cannot load model folder {root}: {e}") from e
    # transformers gives weights missing from the file random values and only logs it.
    if loading["missing_keys"]:
        missing = sorted(loading["missing_keys"])
        raise ModelFolderError(f"{root / TEXT_WEIGHTS} lacks {len(missing)} text-encoder "
                               f"weights, e.g. {', '.join(missing[:3])}")
    if (root / "tokenizer").is_dir():
        tokenizer = SDTokenizer.from_folder(root / "tokenizer")
    else:
        # The tokenizer is a fixed, public vocabulary, so a folder without one is still usable.
        fam = FAMILIES.get(detect_family(unet_cfg, text_cfg))
        tokenizer = SDTokenizer.from_bpe(pad=fam.tokenizer_pad if fam else "eos")
    try:
        schedule = load_schedule_config(root / "scheduler/scheduler_config.json")
    except ValueError as e:
        raise ModelFolderError(str(e)) from e
    return Components(unet, vae, text_encoder, tokenizer, schedule).to(device=device).eval()


def vae_factor_of(path: str | os.PathLike) -> int:
    """The VAE's spatial factor, read from a folder's config (or a single file's header) without
    loading any weights."""
    if Path(path).is_file():
        from .convert.to_components import single_file_vae_factor

        return single_file_vae_factor(path)
    return model_shape_of(path).vae_factor


def _save_weights(module: torch.nn.Module, file: Path, dtype: torch.dtype | None,
                  prefix: str = "") -> None:
    state = {(k if k.startswith(prefix) else prefix + k):
             (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
             for k, v in module.state_dict().items()}
    # transformers refuses safetensors files whose metadata does not name the framework.
    safetensors.torch.save_file(state, str(file), metadata={"format": "pt"})


def save_text_encoder(text_encoder: CLIPTextModel, directory: Path,
                      dtype: torch.dtype | None = None) -> None:
    """config.json + model.safetensors with the canonical `text_model.*` keys.

    transformers 5 keeps CLIPTextModel's layers at the top level and would save them unprefixed;
    every published SD folder (and transformers 4.x) uses the `text_model.` prefix, and 5.x reads
    it too, so that is what we write.
    """
    directory.mkdir(parents=True, exist_ok=True)
    # A copy: the loaded model's own config records the dtype it was loaded in.
    config = CLIPTextConfig.from_dict(text_encoder.config.to_dict())
    config.dtype = TEXT_CONFIG_DTYPE
    config.save_pretrained(directory)
    _save_weights(text_encoder, directory / "model.safetensors", dtype, prefix="text_model.")


# A CLIP's image side kept beside the SD networks (ldm_engine.clip's layout): the image tower
# and its preprocessing, which diffusers' StableDiffusionPipeline takes as optional components,
# and the text projection, which only ldm_engine.clip reads.
CLIP_TOWERS = ("image_encoder", "feature_extractor", "text_projection")


def model_index(schedule_class: str = "DDIMScheduler", *, clip: bool = False) -> dict:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": (["transformers", "CLIPImageProcessor"] if clip else [None, None]),
        **({"image_encoder": ["transformers", "CLIPVisionModelWithProjection"]} if clip else {}),
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", schedule_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def save_model(components: Components, path: str | os.PathLike, *, overwrite: bool = False,
               dtype: torch.dtype | None = None,
               clip_from: str | os.PathLike | None = None) -> Path:
    """Write a diffusers-layout folder atomically; weights optionally cast (e.g. fp16 to ship).

    clip_from: a folder holding the CLIP towers (CLIP_TOWERS) whose text tower is
    components.text_encoder; they are copied as they are (fp32: small, and the scores they give
    should not depend on the shipping dtype). The folder is assembled under a temporary name and
    renamed into place, so an interrupted save never leaves a half-written model where a good one
    was.
    """
    dest = Path(path)
    with atomic_dir(dest, overwrite=overwrite) as tmp:
        for sub, net, weights in (("unet", components.unet, UNET_WEIGHTS),
                                  ("vae", components.vae, VAE_WEIGHTS)):
            (tmp / sub).mkdir()
            net.save_config(tmp / sub)
            _save_weights(net, tmp / weights, dtype)
        save_text_encoder(components.text_encoder, tmp / "text_encoder", dtype)
        components.tokenizer.save(tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler/scheduler_config.json").write_text(
            json.dumps(components.schedule.to_dict("DDIMScheduler"), indent=2) + "\n")
        if clip_from is not None:
            for sub in CLIP_TOWERS:
                shutil.copytree(Path(clip_from) / sub, tmp / sub)
        (tmp / "model_index.json").write_text(
            json.dumps(model_index(clip=clip_from is not None), indent=2) + "\n")
    return dest


def parameter_counts(components: Components) -> dict[str, int]:
    return {name: sum(p.numel() for p in net.parameters())
            for name, net in (("unet", components.unet), ("vae", components.vae),
                              ("text_encoder", components.text_encoder))}
