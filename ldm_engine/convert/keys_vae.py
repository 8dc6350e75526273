"""VAE weight names: diffusers' ``AutoencoderKL`` <-> LDM's (``first_stage_model.*``).

The encoder matches level for level (``encoder.down.i.block.j`` is
``encoder.down_blocks.i.resnets.j``).
The decoder does not: LDM indexes ``decoder.up`` by resolution, so ``up.0`` is the *last* block to
run (full resolution), while diffusers lists ``up_blocks`` in execution order. Up block i of
diffusers is therefore LDM's ``up.{n-1-i}``.

The mid-block attention is the one place a tensor changes shape: LDM computes q, k, v and the output
projection with 1x1 convolutions, weights (C, C, 1, 1); diffusers uses ``nn.Linear``, weights
(C, C).
A 1x1 convolution over a feature map is that Linear applied at every pixel, so the values are
identical and only the two trailing unit dimensions are added or dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .prefix_map import PrefixMap

LDM_PREFIX = "first_stage_model."
# A VAE trained inside LDM keeps its loss (LPIPS net, discriminator, logvar) beside it.
LOSS_PREFIX = LDM_PREFIX + "loss."

_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
              ("to_out.0", "proj_out"))
_CONV_AS_LINEAR = ("to_q", "to_k", "to_v", "to_out.0")


def _resnet(diffusers_path: str, ldm_path: str) -> list[tuple[str, str]]:
    # ResnetBlock names agree except the channel-changing shortcut.
    return [(f"{diffusers_path}.{d}", f"{ldm_path}.{o}")
            for d, o in (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"),
                         ("conv2", "conv2"), ("conv_shortcut", "nin_shortcut"))]


def _mid(side: str) -> list[tuple[str, str]]:
    pairs = _resnet(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1")
    pairs += _resnet(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2")
    pairs += [(f"{side}.mid_block.attentions.0.{d}", f"{side}.mid.attn_1.{o}")
              for d, o in _ATTENTION]
    return pairs


def vae_key_map(config: Mapping) -> PrefixMap:
    n = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    renamed = (("conv_in", "conv_in"), ("conv_norm_out", "norm_out"), ("conv_out", "conv_out"))
    pairs = [(f"{side}.{d}", f"{side}.{o}") for side in ("encoder", "decoder") for d, o in renamed]
    pairs += [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    for i in range(n):
        for j in range(layers):
            pairs += _resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        if i < n - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv",
                          f"encoder.down.{i}.downsample.conv"))
    for i in range(n):
        level = n - 1 - i
        # The decoder runs one more ResBlock per level than the encoder (as in the UNet).
        for j in range(layers + 1):
            pairs += _resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}")
        if i < n - 1:
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv",
                          f"decoder.up.{level}.upsample.conv"))
    pairs += _mid("encoder") + _mid("decoder")
    return PrefixMap(pairs)


def _is_conv_as_linear(diffusers_key: str) -> bool:
    _, mid, name = diffusers_key.partition(".mid_block.attentions.0.")
    return bool(mid) and name.endswith(".weight") and name[:-len(".weight")] in _CONV_AS_LINEAR


def _conv_weight(key: str, value: torch.Tensor) -> torch.Tensor:
    if _is_conv_as_linear(key) and value.ndim == 2:
        return value[:, :, None, None]                            # (C, C) -> (C, C, 1, 1)
    return value


def _linear_weight(key: str, value: torch.Tensor) -> torch.Tensor:
    if _is_conv_as_linear(key) and value.ndim == 4:
        if value.shape[2:] != (1, 1):
            raise ValueError(f"VAE {key} has shape {tuple(value.shape)}; a 1x1 conv was expected")
        return value[:, :, 0, 0]                                  # (C, C, 1, 1) -> (C, C)
    return value


def vae_to_ldm(weights: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    return vae_key_map(config).rename_to_ldm(weights, prefix=LDM_PREFIX, what="VAE",
                                             reshape=_conv_weight)


def vae_from_ldm(weights: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    return vae_key_map(config).rename_to_diffusers(weights, prefix=LDM_PREFIX, what="VAE",
                                                   reshape=_linear_weight)
