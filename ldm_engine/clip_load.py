"""Reading a CLIP from a model folder or a transformers ``CLIPModel`` folder (``clip.load_clip``).

Every file is read by the engine's checked readers before any network is built: configs by
``read_config_file``, safetensors by ``formats``, and a pickle (``pytorch_model.bin``, an open_clip
``.pt``) only through the weights-only unpickler and its allowlist (``convert.ckpt``). A CLIPModel
is built on the meta device and given the file's tensors, so loading costs no random init and
holds the weights once.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import (CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer,
                          CLIPVisionModelWithProjection)

from .clip import (FEATURE_EXTRACTOR, IMAGE_ENCODER, TEXT_PROJECTION, TOWER_FILES, ClipModel,
                   image_processor_class, make_image_processor)
from .config_check import read_config_file
from .convert.ckpt import checkpoint_state_dict, load_pickle
from .errors import ModelFolderError
from .formats import check_safetensors, read_safetensors
from .tokenizer import SDTokenizer

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


# --- (a) a model folder that carries its CLIP --------------------------------------------------

def load_towers(root: Path, *, device, dtype: torch.dtype) -> ClipModel:
    """Case (a): a model folder that carries its CLIP."""
    import transformers

    for rel in TOWER_FILES:
        if not (root / rel).is_file():
            raise ModelFolderError(f"{root} has an image tower but lacks {rel}")
    for rel in TOWER_FILES[1::2]:
        check_safetensors(root / rel)
    for rel in TOWER_FILES[::2]:
        read_config_file(root / rel)
    transformers.utils.logging.disable_progress_bar()
    try:
        text, text_info = CLIPTextModel.from_pretrained(
            root / "text_encoder", dtype=dtype, local_files_only=True, output_loading_info=True)
        vision, vision_info = CLIPVisionModelWithProjection.from_pretrained(
            root / IMAGE_ENCODER, dtype=dtype, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise ModelFolderError(f"cannot load the CLIP towers of {root}: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    for sub, info in (("text_encoder", text_info), (IMAGE_ENCODER, vision_info)):
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise ModelFolderError(f"{root / sub / 'model.safetensors'} lacks {len(missing)} "
                                   f"weights, e.g. {', '.join(missing[:3])}")
    projection = read_text_projection(root / TEXT_PROJECTION, dtype)
    hidden, embed = text.config.hidden_size, vision.config.projection_dim
    if tuple(projection["weight"].shape) != (embed, hidden):
        raise ModelFolderError(f"{root / TEXT_PROJECTION}: weight is "
                               f"{tuple(projection['weight'].shape)}, the towers need "
                               f"({embed}, {hidden}) (image embed dim, text width)")
    linear = torch.nn.Linear(hidden, embed, bias=False, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(projection["weight"])
    if (root / "tokenizer").is_dir():
        tokenizer = SDTokenizer.from_folder(root / "tokenizer")
    else:   # the tokenizer is a fixed, public vocabulary: the text config says the padding
        tokenizer = SDTokenizer.from_bpe(pad="zero" if text.config.pad_token_id == 0 else "eos")
    processor = read_processor(root / FEATURE_EXTRACTOR, vision.config.image_size)
    for net in (text, vision, linear):
        net.to(device)
    return ClipModel(text_model=text, text_projection=linear, vision_model=vision.vision_model,
                     visual_projection=vision.visual_projection,
                     logit_scale=math.exp(float(projection["logit_scale"])),
                     tokenizer=tokenizer, processor=processor, name=root.name)


def read_text_projection(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    config = read_config_file(folder / "config.json")
    state = read_safetensors(folder / "model.safetensors", dtype)
    for key in ("weight", "logit_scale"):
        if key not in state:
            raise ModelFolderError(f"{folder / 'model.safetensors'} lacks the tensor {key!r}")
    weight, scale = state["weight"], state["logit_scale"]
    shape = (config.get("out_features"), config.get("in_features"))
    if weight.ndim != 2 or tuple(weight.shape) != shape:
        raise ModelFolderError(f"{folder}: weight is {tuple(weight.shape)}, config.json says "
                               f"{shape} (out_features, in_features)")
    if scale.numel() != 1 or not math.isfinite(float(scale)):
        raise ModelFolderError(f"{folder / 'model.safetensors'}: logit_scale must be one finite "
                               "number (the log of CLIP's inverse temperature)")
    return {"weight": weight, "logit_scale": scale.reshape(())}


def read_processor(folder: Path, image_size: int):
    """The folder's preprocessor_config.json, else CLIP's transform at the tower's input size
    with OpenAI's mean/std (what transformers' CLIPImageProcessor defaults to)."""
    cls = image_processor_class()
    if (folder / "preprocessor_config.json").is_file():
        read_config_file(folder / "preprocessor_config.json")
        try:
            return cls.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise ModelFolderError(f"cannot read {folder / 'preprocessor_config.json'}: "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                                   ) from e
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    return make_image_processor(image_size=image_size, image_mean=OPENAI_CLIP_MEAN,
                                image_std=OPENAI_CLIP_STD)


# --- reading tensors ---------------------------------------------------------------------------

def read_weights(path: Path, dtype: torch.dtype, *, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """A weights file's tensors: safetensors by our checked reader, a pickle only through the
    weights-only unpickler and its allowlist (``convert.ckpt``), unless trust_pickle."""
    if path.suffix == ".safetensors":
        return read_safetensors(path, dtype)
    if path.suffix not in PICKLE_SUFFIXES:
        raise ModelFolderError(f"{path}: expected a .safetensors file, or a "
                               f"{'/'.join(PICKLE_SUFFIXES)} pickle")
    tensors, _ = checkpoint_state_dict(load_pickle(path, trust_pickle=trust_pickle), path)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def build_clip_model(config: CLIPConfig, state: dict[str, torch.Tensor], where: Path) -> CLIPModel:
    """A CLIPModel holding exactly `state` (no random init, no copy: built on the meta device and
    given the tensors), or a one-line error naming what is missing or extra."""
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # recomputed
    with torch.device("meta"):
        model = CLIPModel(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        what = (f"lacks {len(missing)} CLIP weights, e.g. {', '.join(missing[:3])}" if missing
                else f"has {len(extra)} tensors a CLIPModel does not, e.g. {', '.join(extra[:3])}")
        raise ModelFolderError(f"{where} {what}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ModelFolderError(f"{where}: {key} is {tuple(value.shape)}, the config implies "
                                   f"{tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers are not in any file: the position indices 0..n-1.
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                if name != "position_ids":
                    raise ModelFolderError(f"{where}: no value for buffer {name}")
                module.register_buffer(name, torch.arange(buf.shape[-1]).expand(buf.shape),
                                       persistent=False)
    return model.eval().requires_grad_(False)


# --- (b) a transformers CLIPModel folder -------------------------------------------------------

def _folder_state(root: Path, dtype: torch.dtype, *, trust_pickle: bool) -> dict:
    if (root / "model.safetensors").is_file():
        return read_safetensors(root / "model.safetensors", dtype)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_config_file(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str)
                                                       for v in weight_map.values()):
            raise ModelFolderError(f"{index}: weight_map must map tensor names to file names")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            file = root / shard
            if Path(shard).name != shard or not file.is_file():
                raise ModelFolderError(f"{index} names a shard that is not in {root}: {shard!r}")
            state.update(read_safetensors(file, dtype))
        return state
    if (root / "pytorch_model.bin").is_file():
        return read_weights(root / "pytorch_model.bin", dtype, trust_pickle=trust_pickle)
    raise ModelFolderError(f"CLIP folder {root} has no weights (model.safetensors, "
                           "model.safetensors.index.json or pytorch_model.bin)")


def load_transformers_folder(root: Path, *, dtype: torch.dtype = torch.float32,
                             trust_pickle: bool = False):
    """(CLIPModel, tokenizer, image processor) of a folder ``CLIPModel.save_pretrained`` wrote.

    Tokenizer: transformers' own ``CLIPTokenizer`` from the folder's tokenizer.json or
    vocab.json + merges.txt, as anyone using that folder with transformers gets it (its padding
    token and length; transformers' text normalisation: NFC, whitespace, lower case). A folder
    without one gets our ``SDTokenizer.from_bpe()``, OpenAI's BPE, which every CLIP uses, padded
    with 0 if the text config's pad id is 0, else with EOS. Image processor: the folder's
    preprocessor_config.json, else CLIP's transform at the tower's size with OpenAI's mean/std.
    """
    root = Path(root)
    config_dict = read_config_file(root / "config.json")
    try:
        config = CLIPConfig.from_dict(config_dict)
    except (TypeError, ValueError, KeyError) as e:
        raise ModelFolderError(f"{root / 'config.json'} is not a CLIP config: {e}") from None
    model = build_clip_model(config, _folder_state(root, dtype, trust_pickle=trust_pickle), root)
    if (root / "tokenizer.json").is_file() or (root / "vocab.json").is_file():
        try:
            tokenizer = CLIPTokenizer.from_pretrained(root, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise ModelFolderError(f"cannot read the tokenizer in {root}: "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                                   ) from None
    else:
        pad = "zero" if config.text_config.pad_token_id == 0 else "eos"
        tokenizer = SDTokenizer.from_bpe(pad=pad)
        length = config.text_config.max_position_embeddings
        if length < tokenizer.max_length:
            tokenizer = SDTokenizer(tokenizer.hf, max_length=length)
    processor = read_processor(root, config.vision_config.image_size)
    return model, tokenizer, processor
