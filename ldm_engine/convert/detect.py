"""What a single file holds, read from its tensor names and shapes alone (no tensor data).

Three questions, in order:

1. Is it a Stable Diffusion 1.x/2.x checkpoint at all? Other families are recognised by keys only
   they have (SDXL's ``conditioner.embedders.*``, a UNet with ``label_emb``, ...) and refused with
   those keys named.
2. Which text encoder layout: OpenAI CLIP (SD-1, ``cond_stage_model.transformer.text_model.*``, or
   ``cond_stage_model.transformer.*`` without the ``text_model.`` level) or OpenCLIP (SD-2,
   ``cond_stage_model.model.*``)?
3. The architecture. Widths, depths, block kinds, the UNet's input channels (9 for inpainting)
   and its projection kind are all in the shapes; if they equal a family in ``configs.FAMILIES``,
   that family's configs are used as they are. A few constants are invisible in the weights --
   the attention head counts, CLIP's activation, sample sizes, the VAE scaling factor -- and for an
   unknown shape they come from the layout's base family (SD-1 for CLIP, SD-2 for OpenCLIP), with
   heads of width 64 for the text encoder (true of both CLIP-L and OpenCLIP-H) and SD-1's 8 / SD-2's
   64-wide heads in the UNet.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..configs import FAMILIES, SD1, SD2, ModelFamily, TextEncoderConfig, UNetConfig, VAEConfig
from .errors import CheckpointError, UnsupportedModelError
from .keys_text import CLIP_ROOT, OPEN_CLIP_PREFIX, TextLayout, clip_name
from .keys_unet import LDM_PREFIX as UNET_PREFIX
from .keys_vae import LDM_PREFIX as VAE_PREFIX

Shapes = Mapping[str, tuple[int, ...]]

# Key prefixes only other model families have, and what they give away.
UNSUPPORTED_SIGNATURES = (
    ("conditioner.embedders.", "SDXL (its two text encoders live under conditioner.embedders.*)"),
    (UNET_PREFIX + "label_emb.",
     "a UNet with class/size conditioning (label_emb: SDXL, unCLIP or the x4 upscaler)"),
    (UNET_PREFIX + "joint_blocks.", "SD3 (an MMDiT, not a U-Net)"),
    (UNET_PREFIX + "double_blocks.", "Flux (a transformer, not a U-Net)"),
    ("text_encoders.", "SD3 (text_encoders.*)"),
    ("control_model.", "a ControlNet (control_model.*)"),
    ("depth_model.", "SD-2 depth-to-image (depth_model.*: needs a MiDaS depth network)"),
    ("noise_augmentor.", "unCLIP image variations (noise_augmentor.*)"),
)


def check_supported(keys, source: str) -> TextLayout:
    """The text-encoder layout of a supported SD checkpoint, or an error saying what it is."""
    keys = list(keys)
    for prefix, what in UNSUPPORTED_SIGNATURES:
        hits = [k for k in keys if k.startswith(prefix)]
        if hits:
            raise UnsupportedModelError(
                f"{source} is {what}, which this converter does not support (SD-1.x/2.x only); "
                f"given away by {', '.join(hits[:2])}")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise UnsupportedModelError(
            f"{source} is not a Stable Diffusion checkpoint: no UNet ({UNET_PREFIX}*) among its "
            f"{len(keys)} tensors (e.g. {', '.join(sorted(keys)[:3])}); LoRA, VAE-only and "
            "embedding files cannot be converted to a model")
    if not any(k.startswith(VAE_PREFIX) for k in keys):
        raise UnsupportedModelError(
            f"{source} has a UNet but no VAE ({VAE_PREFIX}*): a full SD checkpoint is needed")
    if any(k.startswith(CLIP_ROOT) for k in keys):
        return "clip"
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in keys):
        return "open_clip"
    raise UnsupportedModelError(
        f"{source} has no text encoder in a known layout ({CLIP_ROOT}* for SD-1, "
        f"{OPEN_CLIP_PREFIX}* for SD-2)")


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def _shape(shapes: Shapes, key: str, source: str, ndim: int | tuple[int, ...]) -> tuple[int, ...]:
    """A tensor's shape, checked to have ndim dimensions (damaged headers can claim any)."""
    try:
        shape = tuple(shapes[key])
    except KeyError:
        raise CheckpointError(f"{source}: expected tensor {key} is missing") from None
    if len(shape) not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise CheckpointError(f"{source}: tensor {key} has shape {shape}, not {ndim}-dimensional")
    return shape


def _infer_unet(shapes: Shapes, source: str) -> dict:
    """UNet shape fields from ``model.diffusion_model.*`` (see keys_unet for the numbering)."""
    s = {k.removeprefix(UNET_PREFIX): v for k, v in shapes.items() if k.startswith(UNET_PREFIX)}
    in_shape = _shape(s, "input_blocks.0.0.weight", source, 4)            # (C0, in_channels, 3, 3)
    n_inputs = len(_indices(s, r"input_blocks\.(\d+)\."))
    downsamplers = _indices(s, r"input_blocks\.(\d+)\.0\.op\.weight")
    layers = downsamplers[0] - 1 if downsamplers else n_inputs - 1
    levels = len(downsamplers) + 1
    if layers < 1 or n_inputs != levels * (layers + 1):
        raise CheckpointError(f"{source}: the UNet's input_blocks do not form an SD U-Net "
                              f"({n_inputs} blocks, downsamplers at {downsamplers})")
    first = [(layers + 1) * i + 1 for i in range(levels)]
    widths = tuple(_shape(s, f"input_blocks.{k}.0.out_layers.3.weight", source, 4)[0]
                   for k in first)
    down = tuple("CrossAttnDownBlock2D" if f"input_blocks.{k}.1.proj_in.weight" in s
                 else "DownBlock2D" for k in first)
    up = tuple("CrossAttnUpBlock2D" if f"output_blocks.{(layers + 1) * i}.1.proj_in.weight" in s
               else "UpBlock2D" for i in range(levels))
    fields = dict(in_channels=in_shape[1], out_channels=_shape(s, "out.2.weight", source, 4)[0],
                  block_out_channels=widths, layers_per_block=layers,
                  down_block_types=down, up_block_types=up)
    to_k = sorted(k for k in s if k.endswith("attn2.to_k.weight"))
    if to_k:
        fields["cross_attention_dim"] = _shape(s, to_k[0], source, 2)[1]
        block = re.escape(to_k[0].split("transformer_blocks.")[0])
        depth = _indices(s, block + r"transformer_blocks\.(\d+)\.")
        if len(depth) != 1:
            raise UnsupportedModelError(
                f"{source}: the UNet's transformers are {len(depth)} blocks deep (SDXL-style); "
                "SD-1.x/2.x use one")
        proj_in = next(k for k in s if k.endswith(".proj_in.weight"))
        # (C, C) Linear (SD-2) vs (C, C, 1, 1) conv (SD-1)
        fields["use_linear_projection"] = len(_shape(s, proj_in, source, (2, 4))) == 2
    return fields


def _infer_vae(shapes: Shapes, source: str) -> dict:
    s = {k.removeprefix(VAE_PREFIX): v for k, v in shapes.items() if k.startswith(VAE_PREFIX)}
    levels = _indices(s, r"encoder\.down\.(\d+)\.")
    layers = _indices(s, r"encoder\.down\.0\.block\.(\d+)\.")
    if not levels or not layers:
        raise CheckpointError(f"{source}: the VAE encoder has no down blocks")
    n = len(levels)
    return dict(
        in_channels=_shape(s, "encoder.conv_in.weight", source, 4)[1],
        out_channels=_shape(s, "decoder.conv_out.weight", source, 4)[0],
        block_out_channels=tuple(_shape(s, f"encoder.down.{i}.block.0.conv2.weight", source, 4)[0]
                                 for i in range(n)),
        layers_per_block=len(layers),
        # quant_conv maps to (mean, log-variance) of the latent: twice its channels.
        latent_channels=_shape(s, "quant_conv.weight", source, 4)[0] // 2,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
    )


def _infer_text(shapes: Shapes, layout: TextLayout, source: str) -> dict:
    if layout == "clip":
        s = {name: v for k, v in shapes.items() if (name := clip_name(k)) is not None}
        vocab, hidden = _shape(s, "embeddings.token_embedding.weight", source, 2)
        positions = _shape(s, "embeddings.position_embedding.weight", source, 2)[0]
        layers = len(_indices(s, r"encoder\.layers\.(\d+)\."))
        intermediate = _shape(s, "encoder.layers.0.mlp.fc1.weight", source, 2)[0]
    else:
        s = {k.removeprefix(OPEN_CLIP_PREFIX): v for k, v in shapes.items()
             if k.startswith(OPEN_CLIP_PREFIX)}
        vocab, hidden = _shape(s, "token_embedding.weight", source, 2)
        positions = _shape(s, "positional_embedding", source, 2)[0]
        layers = len(_indices(s, r"transformer\.resblocks\.(\d+)\."))
        # A full OpenCLIP tower (it has the contrastive text_projection) runs one layer past the
        # penultimate one SD-2 conditions on; files written from diffusers stop at that layer.
        if "text_projection" in s:
            layers -= 1
        intermediate = _shape(s, "transformer.resblocks.0.mlp.c_fc.weight", source, 2)[0]
    return dict(vocab_size=vocab, hidden_size=hidden, max_position_embeddings=positions,
                num_hidden_layers=layers, intermediate_size=intermediate)


@dataclass(frozen=True)
class Architecture:
    family: str                 # a FAMILIES name, or "custom"
    unet: UNetConfig
    vae: VAEConfig
    text_encoder: TextEncoderConfig
    base: ModelFamily           # where the constants the weights do not show came from


def layout_of(family: ModelFamily) -> TextLayout:
    """OpenCLIP ViT-H (SD-2) is the text tower with exact GELU; OpenAI CLIP uses quick_gelu."""
    return "open_clip" if family.text_encoder.hidden_act == "gelu" else "clip"


def _layout_fits(family: ModelFamily, layout: TextLayout) -> bool:
    """Whether a file's text-encoder names can hold the family's text encoder.

    OpenCLIP's names belong to SD-2's tower only. transformers' CLIPTextModel names (layout
    "clip") hold either tower: diffusers' convert_diffusers_to_original_stable_diffusion.py
    recognises SD-2 by a ``text_model.``-prefixed key, so it writes an SD-2 folder saved by
    transformers 5 (no such prefix) in the SD-1 layout. Shapes that are exactly SD-2's then say
    it is SD-2's tower, whose exact-GELU activation the weights cannot show. (``--family`` still
    has to agree with the layout: only the exact shapes make this call.)
    """
    return layout == "clip" or layout_of(family) == layout


def _matches(config, fields: dict) -> bool:
    return all(getattr(config, k) == v for k, v in fields.items())


def infer_architecture(shapes: Shapes, layout: TextLayout, source: str,
                       family: str | None = None) -> Architecture:
    """The configs of the networks in a single file (``family`` forces a family's constants)."""
    unet = _infer_unet(shapes, source)
    vae = _infer_vae(shapes, source)
    text = _infer_text(shapes, layout, source)
    channels = {k: unet.pop(k) for k in ("in_channels", "out_channels")}
    if family is not None:
        fam = FAMILIES[family]
        if layout_of(fam) != layout:
            names = {"clip": "CLIP (SD-1)", "open_clip": "OpenCLIP (SD-2)"}
            raise UnsupportedModelError(f"{source} has a {names[layout]} text encoder, but family "
                                        f"{fam.name} uses {names[layout_of(fam)]}")
        # The user's word decides the constants; the shape check after conversion reports any
        # disagreement between the family and the weights.
        return Architecture(fam.name, dataclasses.replace(fam.unet, **channels), fam.vae,
                            fam.text_encoder, fam)
    for fam in FAMILIES.values():
        if (_matches(fam.unet, unet) and _matches(fam.vae, vae) and _matches(fam.text_encoder, text)
                and _layout_fits(fam, layout)):
            return Architecture(fam.name, dataclasses.replace(fam.unet, **channels), fam.vae,
                                fam.text_encoder, fam)
    base = SD2 if layout == "open_clip" else SD1
    widths = unet["block_out_channels"]
    if base is SD2:
        # SD-2's diffusers config lists heads per level: the width over 64-wide heads.
        if any(w % 64 for w in widths):
            raise CheckpointError(f"{source}: cannot tell the UNet's attention heads for widths "
                                  f"{widths} (SD-2 style needs multiples of 64); pass --family")
        heads: int | tuple[int, ...] = tuple(w // 64 for w in widths)
    else:
        heads = base.unet.attention_head_dim
    if text["hidden_size"] % 64:
        raise CheckpointError(f"{source}: cannot tell the text encoder's attention heads for "
                              f"width {text['hidden_size']}; pass --family")
    return Architecture(
        "custom",
        dataclasses.replace(base.unet, **unet, **channels, attention_head_dim=heads),
        dataclasses.replace(base.vae, **vae),
        dataclasses.replace(base.text_encoder, **text, projection_dim=text["hidden_size"],
                            num_attention_heads=text["hidden_size"] // 64),
        base,
    )
