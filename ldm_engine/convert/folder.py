"""diffusers-layout model folders as ``ModelState``: raw tensors in, raw tensors out.

Tensors are read from and written to the safetensors files directly (no network is built), so
their dtypes and bits pass through untouched unless a cast is asked for. The folder is assembled
under a temporary name, every weights file re-read and compared with what was meant, and only then
renamed into place (``fsutil.atomic_dir``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from transformers import CLIPTextConfig

from ..components import (TEXT_CONFIG_DTYPE, TEXT_WEIGHTS, UNET_WEIGHTS, VAE_WEIGHTS,
                          check_model_folder, detect_family, model_index)
from ..configs import FAMILIES
from ..errors import ModelFolderError, UserInputError
from ..fsutil import atomic_dir
from ..tokenizer import SDTokenizer, read_tokenizer_folder
from .detect import layout_of
from .keys_text import TextLayout
from .model_state import ModelState, cast_weights, meta_networks
from .single_file import safetensors_items, verify_tensors

# Published SD folders (and transformers 4.x) keep CLIPTextModel's weights under `text_model.`;
# transformers 5 reads both spellings. We write the published one and accept either.
TEXT_MODEL_PREFIX = "text_model."
FILES = {"unet": UNET_WEIGHTS, "vae": VAE_WEIGHTS, "text_encoder": TEXT_WEIGHTS}
CONFIGS = {"unet": "unet/config.json", "vae": "vae/config.json",
           "text_encoder": "text_encoder/config.json"}


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} must hold a JSON object")
    return data


def _tokenizer_pad(root: Path, family: str) -> str:
    # The folder's tokenizer is checked to be CLIP's (either layout: vocab.json + merges.txt, or
    # transformers 5's tokenizer.json) before it is replaced by the canonical one on writing.
    if (root / "tokenizer").is_dir():
        return read_tokenizer_folder(root / "tokenizer").pad
    return FAMILIES[family].tokenizer_pad if family in FAMILIES else "eos"


def text_layout_for(text_config: dict, family: str) -> TextLayout:
    """How a folder's text encoder is written into a single file: the family's layout, or for a
    custom shape OpenCLIP if it uses exact GELU (OpenCLIP-H's activation), else OpenAI CLIP."""
    if family in FAMILIES:
        return layout_of(FAMILIES[family])
    return "open_clip" if text_config.get("hidden_act") == "gelu" else "clip"


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path))
    except (safetensors.SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ModelFolderError(f"cannot read {path}: {e}") from None


def read_folder(path: str | os.PathLike, *, family: str | None = None) -> ModelState:
    root = check_model_folder(path)                 # names the first missing or broken file
    configs = {name: _json(root / rel) for name, rel in CONFIGS.items()}
    weights = {name: _read_weights(root / rel) for name, rel in FILES.items()}
    weights["text_encoder"] = {k.removeprefix(TEXT_MODEL_PREFIX): v
                               for k, v in weights["text_encoder"].items()}
    detected = detect_family(configs["unet"], configs["text_encoder"])
    if family is not None and detected in FAMILIES and \
            layout_of(FAMILIES[family]) != layout_of(FAMILIES[detected]):
        raise UserInputError(f"{root} is a {detected} model, whose text encoder is not laid out "
                             f"like {family}'s; drop --family")
    layout_family = family or detected
    return ModelState(
        unet=weights["unet"], vae=weights["vae"], text_encoder=weights["text_encoder"],
        unet_config=configs["unet"], vae_config=configs["vae"], text_config=configs["text_encoder"],
        scheduler_config=_json(root / "scheduler/scheduler_config.json"),
        tokenizer_pad=_tokenizer_pad(root, layout_family),
        text_layout=text_layout_for(configs["text_encoder"], layout_family),
        family=detected,
    )


def write_folder(state: ModelState, dest: str | os.PathLike, *, dtype: torch.dtype | None = None,
                 overwrite: bool = False) -> Path:
    dest = Path(dest)
    unet, vae, _ = meta_networks(state)
    planned = {
        "unet": cast_weights(state.unet, dtype),
        "vae": cast_weights(state.vae, dtype),
        "text_encoder": {TEXT_MODEL_PREFIX + k: v
                         for k, v in cast_weights(state.text_encoder, dtype).items()},
    }
    text_config = CLIPTextConfig.from_dict(state.text_config)
    # Not the weights' dtype: the dtype a default load gives (see components.TEXT_CONFIG_DTYPE).
    text_config.dtype = TEXT_CONFIG_DTYPE
    index = model_index()
    if state.unet_config.get("in_channels") == 9:
        # 4 latent + 1 mask + 4 masked-image latent channels: diffusers' inpainting pipeline.
        index["_class_name"] = "StableDiffusionInpaintPipeline"
    with atomic_dir(dest, overwrite=overwrite) as tmp:
        for name, net in (("unet", unet), ("vae", vae)):
            net.save_config(tmp / name)
        text_config.save_pretrained(tmp / "text_encoder")
        for name, rel in FILES.items():
            # transformers refuses safetensors files whose metadata does not name the framework.
            safetensors.torch.save_file(planned[name], str(tmp / rel), metadata={"format": "pt"})
        SDTokenizer.from_bpe(pad=state.tokenizer_pad).save(tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler/scheduler_config.json").write_text(
            json.dumps(state.scheduler_config, indent=2) + "\n")
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        check_model_folder(tmp)
        for name, rel in FILES.items():
            verify_tensors(planned[name], safetensors_items(tmp / rel), str(dest / rel))
    return dest

