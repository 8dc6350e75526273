"""UNet weight names: diffusers' ``UNet2DConditionModel`` <-> LDM's ``openaimodel.UNetModel``.

LDM keeps the U-Net as three flat lists. With L = layers_per_block and n levels:

    input_blocks[0]                      conv_in
    input_blocks[(L+1)i + 1 + j]         level i, layer j: ResBlock [, SpatialTransformer]
    input_blocks[(L+1)(i+1)]             level i's Downsample (every level but the deepest)
    middle_block[0, 1, 2]                ResBlock, SpatialTransformer, ResBlock
    output_blocks[(L+1)i + j]            up level i (deepest first), layer j < L+1:
                                         ResBlock [, SpatialTransformer] [, Upsample on j = L]

diffusers nests the same modules as down_blocks[i].resnets[j] / .attentions[j] / .downsamplers[0],
mid_block, and up_blocks[i] (deepest first, like output_blocks). The transformer blocks inside a
SpatialTransformer carry identical names in both (norm, proj_in, transformer_blocks.k.attn1.to_q,
ff.net.0.proj, ...), including SD-2's Linear proj_in/proj_out, so only module paths move and no
tensor changes shape.

The EMA copy that LDM training keeps (``LitEma``) stores each UNet parameter under its module path
with the dots removed: ``model.diffusion_model.input_blocks.0.0.weight`` has the EMA twin
``model_ema.diffusion_modelinput_blocks00weight``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .prefix_map import PrefixMap

LDM_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
# LitEma's bookkeeping scalars, not weights.
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")

# ResBlock (LDM) <-> ResnetBlock2D (diffusers). LDM's Sequentials interleave SiLU and Dropout, which
# is why the norm/conv indices skip: in_layers = [GroupNorm, SiLU, Conv],
# emb_layers = [SiLU, Linear], out_layers = [GroupNorm, SiLU, Dropout, Conv].
_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)


def _resnet(diffusers_path: str, ldm_path: str) -> list[tuple[str, str]]:
    return [(f"{diffusers_path}.{d}", f"{ldm_path}.{o}") for d, o in _RESNET]


def unet_key_map(config: Mapping) -> PrefixMap:
    """The rename table for a UNet of this diffusers config (a ``unet/config.json`` dict)."""
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    n = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"per-level layers_per_block {layers!r} has no LDM equivalent")
    if len(down_types) != n or len(up_types) != n:
        raise ValueError("down_block_types/up_block_types must have one entry per level")

    pairs = [
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("conv_in", "input_blocks.0.0"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
    ]
    for i, kind in enumerate(down_types):
        for j in range(layers):
            k = (layers + 1) * i + 1 + j
            pairs += _resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0")
            if kind.startswith("CrossAttn"):
                pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1"))
        if i < n - 1:
            # LDM's Downsample wraps its strided conv as `.op`.
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv",
                          f"input_blocks.{(layers + 1) * (i + 1)}.0.op"))

    pairs += _resnet("mid_block.resnets.0", "middle_block.0")
    pairs.append(("mid_block.attentions.0", "middle_block.1"))
    pairs += _resnet("mid_block.resnets.1", "middle_block.2")

    for i, kind in enumerate(up_types):
        has_attention = kind.startswith("CrossAttn")
        for j in range(layers + 1):
            k = (layers + 1) * i + j
            pairs += _resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0")
            if has_attention:
                pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1"))
        if i < n - 1:
            # The Upsample follows the last layer's ResBlock and, if present, its transformer.
            last = (layers + 1) * i + layers
            position = 2 if has_attention else 1
            pairs.append((f"up_blocks.{i}.upsamplers.0", f"output_blocks.{last}.{position}"))
    return PrefixMap(pairs)


def unet_to_ldm(weights: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers UNet state dict -> ``model.diffusion_model.*`` keys (same tensors, no copies)."""
    return unet_key_map(config).rename_to_ldm(weights, prefix=LDM_PREFIX, what="UNet")


def unet_from_ldm(weights: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """``model.diffusion_model.*`` tensors (prefix included) -> diffusers UNet state dict."""
    return unet_key_map(config).rename_to_diffusers(weights, prefix=LDM_PREFIX, what="UNet")


def ema_key(ldm_key: str) -> str:
    """The LitEma name of a ``model.diffusion_model.*`` parameter."""
    return EMA_PREFIX + ldm_key.removeprefix("model.").replace(".", "")


def has_ema(keys) -> bool:
    return any(k.startswith(EMA_PREFIX) and k not in EMA_BOOKKEEPING for k in keys)


def select_ema(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet's EMA weights under their live names, one for every live UNet key.

    Names are matched one by one (never by position), so an EMA set that misses a parameter is
    an error rather than a silent mix of EMA and live weights.
    """
    live = [k for k in weights if k.startswith(LDM_PREFIX)]
    missing = [ema_key(k) for k in live if ema_key(k) not in weights]
    if missing:
        raise KeyError(f"the EMA weights are incomplete: no {', '.join(missing[:3])}")
    return {k: weights[ema_key(k)] for k in live}
