"""open_clip checkpoints as a transformers ``CLIPModel``, without importing open_clip.

open_clip (and OpenAI's original CLIP, which it copies) names the same ViT-CLIP that transformers
implements differently, so an open_clip state dict maps onto ``CLIPModel`` by renaming, with
three changes of form (the facts transformers' ``convert_clip_original_pytorch_to_hf.py`` rests on):

* ``nn.MultiheadAttention`` keeps q, k, v as one packed projection; transformers has three:
      attn.in_proj_weight = cat(q_proj.weight, k_proj.weight, v_proj.weight)    # (3W, W)
      attn.in_proj_bias   = cat(q_proj.bias,   k_proj.bias,   v_proj.bias)      # (3W,)
* the projections into the joint space are bare matrices applied as ``x @ proj``, so
      visual.proj (W_img, E)     -> visual_projection.weight = proj.T   (nn.Linear is x @ W.T)
      text_projection (W_txt, E) -> text_projection.weight   = text_projection.T
* the positional embeddings are bare Parameters, transformers' are Embedding tables (same
  values), and ``logit_scale`` is the log of the inverse temperature in both.

The towers must be what ``CLIPModel`` computes: a ViT with a class token, learnt (or fixed
sin-cos) positions, a pre-LayerNorm, class-token pooling and no bias on the projection; a causal
text transformer pooled at the EOS token (the highest id). Anything else (ModifiedResNet,
timm or ConvNeXt towers, Hugging Face text towers, attentional pooling, layer scale, SigLIP's
logit bias, CoCa...) is refused in one line naming the setting, never converted approximately.

The architecture comes from ``open_clip_config.json`` beside the checkpoint (the hub layout:
{"model_cfg": ..., "preprocess_cfg": ...}) or from the JSON of a named model in an installed
open_clip's ``model_configs/``, found with ``importlib.util.find_spec`` (which does not run it).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import torch
from transformers import CLIPConfig

from .clip import image_processor_class, make_image_processor
from .clip_load import PICKLE_SUFFIXES, build_clip_model, read_weights
from .config_check import read_config_file
from .errors import ModelFolderError
from .formats import check_safetensors
from .tokenizer import SDTokenizer

# open_clip's image normalisation when a checkpoint says nothing (OpenAI's dataset statistics).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_BLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")
_ARCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# --- (c) open_clip -----------------------------------------------------------------------------

def _installed_model_config(arch: str) -> dict:
    if not _ARCH_NAME.fullmatch(arch):
        raise ModelFolderError(f"{arch!r} is not an open_clip model name (e.g. ViT-B-32)")
    spec = importlib.util.find_spec("open_clip")          # finds the package, does not run it
    if spec is None or not spec.submodule_search_locations:
        raise ModelFolderError(f"arch={arch!r} names an open_clip config, but open_clip is not "
                               "installed: put its open_clip_config.json beside the checkpoint")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model_configs"
    file = folder / f"{arch}.json"
    if not file.is_file():
        known = sorted(p.stem for p in folder.glob("*.json"))
        close = [k for k in known if k.lower().startswith(arch.lower()[:5])][:6]
        raise ModelFolderError(f"open_clip has no model config {arch!r}"
                               + (f" (similar: {', '.join(close)})" if close else ""))
    return read_config_file(file)


def open_clip_config(path: Path, arch: str | None) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) for a checkpoint: arch if given, else open_clip_config.json
    beside it (or in it, for a folder)."""
    if arch is not None:
        return _installed_model_config(arch), {}
    folder = path if path.is_dir() else path.parent
    file = folder / "open_clip_config.json"
    if not file.is_file():
        raise ModelFolderError(f"{path}: an open_clip checkpoint needs its architecture: "
                               f"open_clip_config.json beside it, or arch= an open_clip model "
                               "name such as ViT-B-32")
    data = read_config_file(file)
    model_cfg = data.get("model_cfg", data)
    preprocess_cfg = data.get("preprocess_cfg", {})
    if not isinstance(model_cfg, dict) or not isinstance(preprocess_cfg, dict):
        raise ModelFolderError(f"{file}: model_cfg and preprocess_cfg must be JSON objects")
    return model_cfg, preprocess_cfg


def _weights_in(folder: Path) -> Path:
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir()
                   if p.suffix in (".safetensors", *PICKLE_SUFFIXES) and p.is_file())
    if len(found) != 1:
        raise ModelFolderError(f"{folder}: expected one open_clip weights file "
                               f"(open_clip_model.safetensors), found {len(found)}")
    return found[0]


# Settings CLIPModel cannot express, with the value under which they are harmless.
_VISION_DEFAULTS = {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
                    "pool_type": "tok", "act_kwargs": None, "norm_kwargs": None,
                    "qk_norm": False, "scaled_cosine_attn": False,
                    "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
                    "scale_fc": False, "timm_model_name": None}
_TEXT_DEFAULTS = {"hf_model_name": None, "hf_tokenizer_name": None, "tokenizer_mode": None,
                  "ls_init_value": None, "embed_cls": False, "pad_id": 0,
                  "no_causal_mask": False, "proj_bias": False, "proj_type": "linear",
                  "act_kwargs": None, "norm_kwargs": None, "qk_norm": False,
                  "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
                  "scale_attn": False, "scale_fc": False}
# Settings that change nothing at inference here (training-only, or read only by the features
# refused above). Any key outside these lists is refused: a setting open_clip adds later must not
# be ignored silently.
_VISION_INERT = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size",
                 "patch_dropout", "attn_pooler_queries", "attn_pooler_heads", "pos_embed_type",
                 "final_ln_after_pool", "output_tokens", "block_type", "timm_model_pretrained",
                 "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"}
_TEXT_INERT = {"context_length", "vocab_size", "tokenizer_kwargs", "width", "heads", "layers",
               "mlp_ratio", "eos_id", "final_ln_after_pool", "pool_type", "output_tokens",
               "block_type", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
_MODEL_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text",
               "init_logit_scale", "nonscalar_logit_scale", "cast_dtype"}


def _refuse(where: str, what: str) -> ModelFolderError:
    return ModelFolderError(f"{where}: {what}, which a transformers CLIPModel cannot run; only "
                            "ViT image towers with open_clip's standard text transformer convert")


def _square(value, name: str, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise _refuse(where, f"{name} {value} is not square")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelFolderError(f"{where}: {name} must be a positive integer, got {value!r}")
    return value


def _positive_int(cfg: dict, key: str, default, where: str) -> int:
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelFolderError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def clip_config_from_open_clip(model_cfg: dict, where: str = "open_clip config") -> CLIPConfig:
    """The transformers CLIPConfig of an open_clip model config, or a one-line refusal."""
    for key in model_cfg:
        if key not in _MODEL_KEYS:
            # multimodal_cfg (CoCa), init_logit_bias (SigLIP), ...: not a plain CLIP.
            raise _refuse(where, f"it sets {key}")
    vision, text = model_cfg.get("vision_cfg"), model_cfg.get("text_cfg")
    if not isinstance(vision, dict) or not isinstance(text, dict):
        raise ModelFolderError(f"{where}: vision_cfg and text_cfg must be JSON objects")
    if isinstance(vision.get("layers"), (list, tuple)):
        raise _refuse(where, "its image tower is a ModifiedResNet (vision_cfg.layers is a list)")
    for cfg, defaults, inert, tower in ((vision, _VISION_DEFAULTS, _VISION_INERT, "vision_cfg"),
                                        (text, _TEXT_DEFAULTS, _TEXT_INERT, "text_cfg")):
        for key, value in cfg.items():
            if key in defaults:
                harmless = defaults[key]
                if value != harmless and not (harmless is None and value == {}):
                    raise _refuse(where, f"{tower}.{key} is {value!r}")
            elif key not in inert:
                raise _refuse(where, f"it sets {tower}.{key}")
        if cfg.get("block_type") not in (None, "default"):
            raise _refuse(where, f"{tower}.block_type is {cfg['block_type']!r}")
    if vision.get("pos_embed_type", "learnable") not in ("learnable", "sin_cos_2d"):
        raise _refuse(where, f"vision_cfg.pos_embed_type is {vision['pos_embed_type']!r}")
    if text.get("pool_type", "argmax") not in ("argmax", "eos") or (
            text.get("pool_type") == "eos" and text.get("eos_id") != 49407):
        raise _refuse(where, f"text_cfg.pool_type is {text.get('pool_type')!r} (only pooling "
                      "at the EOS token converts)")
    if text.get("tokenizer_kwargs") not in (None, {}, {"clean": "lower"}):
        raise _refuse(where, f"text_cfg.tokenizer_kwargs is {text['tokenizer_kwargs']!r}")
    if text.get("vocab_size", 49408) != 49408:
        raise _refuse(where, f"text_cfg.vocab_size is {text['vocab_size']} (CLIP's BPE has "
                      "49408 tokens)")
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    embed = _positive_int(model_cfg, "embed_dim", None, where)
    v_width = _positive_int(vision, "width", 768, where)
    head_width = _positive_int(vision, "head_width", 64, where)
    if v_width % head_width:
        raise ModelFolderError(f"{where}: vision width {v_width} is not a multiple of "
                               f"head_width {head_width}")
    image_size = _square(vision.get("image_size", 224), "image_size", where)
    patch = _square(vision.get("patch_size", 16), "patch_size", where)
    if image_size % patch:
        raise ModelFolderError(f"{where}: image_size {image_size} is not a multiple of "
                               f"patch_size {patch}")
    t_width = _positive_int(text, "width", 512, where)
    heads = _positive_int(text, "heads", 8, where)
    if t_width % heads:
        raise ModelFolderError(f"{where}: text width {t_width} is not a multiple of {heads} heads")
    vision_config = dict(
        hidden_size=v_width, intermediate_size=int(v_width * vision.get("mlp_ratio", 4.0)),
        num_hidden_layers=_positive_int(vision, "layers", 12, where),
        num_attention_heads=v_width // head_width, image_size=image_size, patch_size=patch,
        projection_dim=embed, hidden_act=act, layer_norm_eps=1e-5)
    text_config = dict(
        vocab_size=49408, hidden_size=t_width,
        intermediate_size=int(t_width * text.get("mlp_ratio", 4.0)),
        num_hidden_layers=_positive_int(text, "layers", 12, where), num_attention_heads=heads,
        max_position_embeddings=_positive_int(text, "context_length", 77, where),
        hidden_act=act, layer_norm_eps=1e-5, projection_dim=embed,
        # Real ids (open_clip pads with 0) so the pooled state is read at the EOS token.
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=embed)


_RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight",
               "text_projection": "text_projection.weight"}
_BLOCK_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
# Buffers open_clip rebuilds (the causal mask) and transformers recomputes.
_DROPPED = ("attn_mask",)


def open_clip_state_to_transformers(state: dict[str, torch.Tensor],
                                    where: str = "open_clip checkpoint") -> dict[str, torch.Tensor]:
    """An open_clip ViT-CLIP state dict in transformers CLIPModel's names (see the module doc)."""
    if any(k.startswith("module.") for k in state):       # saved from DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("text.") for k in state):         # CustomTextCLIP keeps the tower apart
        state = {k.removeprefix("text."): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key in _DROPPED:
            continue
        if key in _RENAMES:
            out[_RENAMES[key]] = value.reshape(()) if key == "logit_scale" else value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.T.contiguous()          # x @ P == Linear(W = P.T)
        elif (m := _BLOCK.fullmatch(key)):
            tower = "vision_model" if m.group(1) else "text_model"
            layer, part = f"{tower}.encoder.layers.{m.group(2)}", m.group(3)
            if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = part.rsplit("_", 1)[1]
                if value.shape[0] % 3:
                    raise ModelFolderError(f"{where}: {key} does not split into q, k, v")
                # Copies, not views: three views of one storage cannot be saved as safetensors.
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                    out[f"{layer}.self_attn.{name}.{kind}"] = chunk.clone()
                continue
            prefix, _, leaf = part.rpartition(".")
            if prefix not in _BLOCK_PARTS:
                unknown.append(key)
                continue
            out[f"{layer}.{_BLOCK_PARTS[prefix]}.{leaf}"] = value
        else:
            unknown.append(key)
    if unknown:
        if "logit_bias" in unknown:
            raise _refuse(where, "it has a logit_bias (a SigLIP-style sigmoid model)")
        raise _refuse(where, f"it holds tensors outside a ViT-CLIP: {', '.join(unknown[:4])}")
    return out


def _processor_from_open_clip(preprocess: dict, image_size: int, where: str):
    """open_clip's eval transform (Resize shortest edge, CenterCrop, Normalize) as a processor."""
    size = preprocess.get("size", image_size)
    size = _square(size, "preprocess_cfg.size", where)
    interpolation = preprocess.get("interpolation", "bicubic")
    resample = {"bicubic": 3, "bilinear": 2, "nearest": 0}.get(interpolation)
    if resample is None:
        raise ModelFolderError(f"{where}: preprocess_cfg.interpolation {interpolation!r} is not "
                               "bicubic, bilinear or nearest")
    mode = preprocess.get("resize_mode", "shortest")
    mean, std = preprocess.get("mean", OPENAI_MEAN), preprocess.get("std", OPENAI_STD)
    if not all(isinstance(v, (list, tuple)) and len(v) == 3 for v in (mean, std)):
        raise ModelFolderError(f"{where}: preprocess_cfg mean and std need 3 values each")
    if mode == "shortest":
        return make_image_processor(image_size=size, image_mean=mean, image_std=std,
                                    resample=resample)
    if mode == "squash":       # resize to size x size, aspect not kept: nothing to crop
        return image_processor_class()(
            size={"height": size, "width": size}, do_center_crop=False, image_mean=list(mean),
            image_std=list(std), resample=resample, do_resize=True, do_rescale=True,
            do_normalize=True, do_convert_rgb=True)
    raise ModelFolderError(f"{where}: preprocess_cfg.resize_mode {mode!r} is not supported "
                           "(shortest or squash)")


def load_open_clip(path: Path, *, arch: str | None = None, dtype: torch.dtype = torch.float32,
                   trust_pickle: bool = False):
    """(CLIPModel, SDTokenizer, image processor) of an open_clip checkpoint file or hub folder.

    The tokenizer is open_clip's: OpenAI's BPE with its cleaning, rows of context_length ids
    padded with 0 (``SDTokenizer`` with pad="zero", as SD-2.x's OpenCLIP tower pads).
    """
    path = Path(path)
    file = _weights_in(path) if path.is_dir() else path
    where = str(file)
    model_cfg, preprocess_cfg = open_clip_config(path, arch)
    config_name = (f"open_clip model {arch}" if arch is not None
                   else str(file.parent / "open_clip_config.json"))
    config = clip_config_from_open_clip(model_cfg, where=config_name)
    if file.suffix == ".safetensors":
        check_safetensors(file)
    state = open_clip_state_to_transformers(read_weights(file, dtype, trust_pickle=trust_pickle),
                                            where)
    model = build_clip_model(config, state, file)
    tokenizer = SDTokenizer.from_bpe(pad="zero")
    length = config.text_config.max_position_embeddings
    if length != tokenizer.max_length:
        tokenizer = SDTokenizer(tokenizer.hf, max_length=length)
    processor = _processor_from_open_clip(preprocess_cfg, config.vision_config.image_size, where)
    return model, tokenizer, processor


def save_open_clip_config(path: Path, model_cfg: dict, preprocess_cfg: dict | None = None) -> None:
    """Write the hub layout's open_clip_config.json (for tests and for users pairing a bare
    checkpoint with its architecture)."""
    data = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
