"""Text-encoder weight names: transformers' ``CLIPTextModel`` <-> the two SD single-file layouts.

SD-1.x (layout "clip") stores OpenAI CLIP ViT-L/14 as a Hugging Face CLIPTextModel under
``cond_stage_model.transformer.``, so the names below that prefix are transformers' own. Most files
spell them with the ``text_model.`` level that CLIPTextModel had until transformers 5
(``...transformer.text_model.encoder.layers.0...``), which is what we write; older community
checkpoints, and files diffusers' ``convert_diffusers_to_original_stable_diffusion.py`` writes from a
folder saved by transformers 5, leave it out (``...transformer.encoder.layers.0...``). Both read
(AUTOMATIC1111 also accepts both, by renaming the second to the first); a file holding the same
tensor in both spellings is refused.

SD-2.x (layout "open_clip") stores OpenCLIP ViT-H/14's text tower under ``cond_stage_model.model.``
with OpenCLIP's names, and ``nn.MultiheadAttention`` keeps q, k and v as one fused projection:

    attn.in_proj_weight = cat(q_proj.weight, k_proj.weight, v_proj.weight)   # (3E, E)
    attn.in_proj_bias   = cat(q_proj.bias,   k_proj.bias,   v_proj.bias)     # (3E,)

SD-2 conditions on the *penultimate* layer of the 24-layer tower (followed by ln_final), so a
diffusers folder holds 23 layers, and a full OpenCLIP file has tensors a folder cannot hold: layer
24 (``resblocks.23``), ``text_projection`` and ``logit_scale``. Reading, they are dropped (and
reported); writing, we emit the 23 layers and ln_final, which is everything SD-2 inference uses.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

import torch

from .prefix_map import PrefixMap

TextLayout = Literal["clip", "open_clip"]
CLIP_ROOT = "cond_stage_model.transformer."
CLIP_PREFIX = CLIP_ROOT + "text_model."  # the spelling we write
OPEN_CLIP_PREFIX = "cond_stage_model.model."
TEXT_PREFIX = "cond_stage_model."

# Recomputed by CLIPTextModel at load time (arange(77)); older transformers saved it anyway.
_CLIP_BUFFERS = ("embeddings.position_ids",)
# OpenCLIP tensors outside the penultimate-layer path that SD-2 uses.
_OPEN_CLIP_UNUSED = ("text_projection", "logit_scale", "attn_mask")
_QKV = ("q_proj", "k_proj", "v_proj")
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.")


def clip_name(key: str) -> str | None:
    """The CLIPTextModel name of an SD-1 text-encoder key in either spelling, else None."""
    if not key.startswith(CLIP_ROOT):
        return None
    return key.removeprefix(CLIP_ROOT).removeprefix("text_model.")


def _open_clip_map(num_layers: int) -> PrefixMap:
    pairs = [
        ("embeddings.token_embedding", "token_embedding"),
        # OpenCLIP keeps the positions as a bare Parameter, not an Embedding module.
        ("embeddings.position_embedding.weight", "positional_embedding"),
        ("final_layer_norm", "ln_final"),
    ]
    for i in range(num_layers):
        d, o = f"encoder.layers.{i}", f"transformer.resblocks.{i}"
        pairs += [(f"{d}.layer_norm1", f"{o}.ln_1"), (f"{d}.layer_norm2", f"{o}.ln_2"),
                  (f"{d}.mlp.fc1", f"{o}.mlp.c_fc"), (f"{d}.mlp.fc2", f"{o}.mlp.c_proj"),
                  (f"{d}.self_attn.out_proj", f"{o}.attn.out_proj")]
    return PrefixMap(pairs)


def text_to_ldm(weights: Mapping[str, torch.Tensor], config: Mapping,
                layout: TextLayout) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel state dict -> single-file keys of the given layout."""
    if layout == "clip":
        return {CLIP_PREFIX + k: v for k, v in weights.items()}
    num_layers = config["num_hidden_layers"]
    # q/k/v are fused into OpenCLIP's in_proj below; everything else is a plain rename.
    plain = {k: v for k, v in weights.items() if k.rsplit(".", 2)[-2] not in _QKV}
    out = _open_clip_map(num_layers).rename_to_ldm(plain, prefix=OPEN_CLIP_PREFIX,
                                                   what="text-encoder")
    for i in range(num_layers):
        attn = f"encoder.layers.{i}.self_attn"
        for kind, fused in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            parts = [weights[f"{attn}.{p}.{kind}"] for p in _QKV]
            out[f"{OPEN_CLIP_PREFIX}transformer.resblocks.{i}.attn.{fused}"] = torch.cat(parts)
    return out


def is_unused_text_key(key: str, layout: TextLayout, num_layers: int) -> bool:
    """A text-encoder tensor of a single file that a diffusers folder has no place for."""
    if layout == "clip":
        return clip_name(key) in _CLIP_BUFFERS
    name = key.removeprefix(OPEN_CLIP_PREFIX)
    block = _RESBLOCK.match(name)
    return name in _OPEN_CLIP_UNUSED or bool(block and int(block.group(1)) >= num_layers)


def text_from_ldm(weights: Mapping[str, torch.Tensor], config: Mapping,
                  layout: TextLayout) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``cond_stage_model.*`` tensors -> (CLIPTextModel state dict, keys dropped on purpose)."""
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unmapped: list[str] = []
    num_layers = config["num_hidden_layers"]
    if layout == "clip":
        spelled: dict[str, str] = {}
        for key, value in weights.items():
            name = clip_name(key)
            if name is None:
                unmapped.append(key)
            elif name in spelled:
                raise KeyError(f"text-encoder tensor {name} is there twice, as {spelled[name]} "
                               f"and {key}")
            elif is_unused_text_key(key, layout, num_layers):
                dropped.append(key)
            else:
                out[name] = value
            if name is not None:
                spelled[name] = key
    else:
        table = _open_clip_map(num_layers)
        for key, value in weights.items():
            name = key.removeprefix(OPEN_CLIP_PREFIX)
            block = _RESBLOCK.match(name)
            if not key.startswith(OPEN_CLIP_PREFIX):
                unmapped.append(key)
            elif is_unused_text_key(key, layout, num_layers):
                dropped.append(key)
            elif name.endswith((".attn.in_proj_weight", ".attn.in_proj_bias")):
                layer = f"encoder.layers.{block.group(1)}.self_attn" if block else None
                if layer is None or value.ndim == 0 or value.shape[0] % 3:
                    unmapped.append(key)
                    continue
                kind = "weight" if name.endswith("weight") else "bias"
                # Copies, not views: three views of one storage could not be saved as safetensors.
                for part, chunk in zip(_QKV, value.chunk(3)):
                    out[f"{layer}.{part}.{kind}"] = chunk.clone()
            else:
                mapped = table.to_diffusers(name)
                if mapped is None:
                    unmapped.append(key)
                else:
                    out[mapped] = value
    if unmapped:
        raise KeyError("text-encoder weights this architecture does not have: "
                       f"{', '.join(unmapped[:5])}")
    return out, dropped
