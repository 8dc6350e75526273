"""DeepCache-style feature reuse (Ma et al. 2023): an approximation, off by default.

Adjacent denoising steps change the UNet's deep, low-resolution features very little, while the
shallow full-resolution path carries the detail that does change. So every `interval`-th step runs
the whole network and keeps the feature map entering the last up block; the steps in between run
only the shallow ends, conv_in + the first down block, and the last up block + conv_out, with the
kept deep feature in place of the rest. On SD-1.5 the deep part is most of the FLOPs, so a step
in between costs a fraction of a full one.

The network is diffusers' UNet2DConditionModel, split here into three pieces that call its own
submodules in the order its forward does:

    head(x, t, c)                -> emb, skips, h      conv_in, time embedding, down_blocks[0]
    deep(h, emb, c, skips)       -> feature            down_blocks[1:], mid_block, up_blocks[:-1]
    tail(feature, emb, c, skips) -> out                up_blocks[-1] on the first skips, conv_out

head + deep + tail equals the network's forward (tested bit for bit); only the reuse of `feature`
is approximate. Each piece takes and returns flat tensors, so each can be AOT-compiled.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from diffusers import UNet2DConditionModel

from ldm_engine.errors import UserInputError

Piece = Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]   # flat tensors in and out


def check_supported(unet: UNet2DConditionModel) -> None:
    cfg = unet.config
    extras = {"class embeddings": unet.class_embedding is not None,
              "addition embeddings": getattr(unet, "add_embedding", None) is not None,
              "encoder_hid_proj": getattr(unet, "encoder_hid_proj", None) is not None,
              "time_embed_act": getattr(unet, "time_embed_act", None) is not None,
              "center_input_sample": bool(cfg.center_input_sample),
              "no mid block": unet.mid_block is None}
    bad = [k for k, v in extras.items() if v]
    if bad:
        raise UserInputError(f"deep cache supports plain SD-1.x/2.x UNets; this one has "
                             f"{', '.join(bad)}")


def _cross(block) -> bool:
    return getattr(block, "has_cross_attention", False)


def head(unet: UNet2DConditionModel, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor
         ) -> tuple[torch.Tensor, ...]:
    """-> (emb, *skips): the time embedding, conv_in's output, then down_blocks[0]'s outputs.

    A down block's last output is also its hidden state (after the downsampler), which is what
    deep() continues from.
    """
    emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t))
    h = unet.conv_in(x)
    block = unet.down_blocks[0]
    if _cross(block):
        _, res = block(hidden_states=h, temb=emb, encoder_hidden_states=states)
    else:
        _, res = block(hidden_states=h, temb=emb)
    return (emb, h, *res)


def deep(unet: UNet2DConditionModel, emb: torch.Tensor, states: torch.Tensor,
         *head_skips: torch.Tensor) -> torch.Tensor:
    """The rest of the down path, the mid block and every up block but the last -> its input."""
    skips = list(head_skips)
    h = skips[-1]
    for block in unet.down_blocks[1:]:
        if _cross(block):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=states)
        else:
            h, res = block(hidden_states=h, temb=emb)
        skips.extend(res)
    if _cross(unet.mid_block):
        h = unet.mid_block(h, emb, encoder_hidden_states=states)
    else:
        h = unet.mid_block(h, emb)
    # Sizes that are not a multiple of the total upsampling factor need explicit target sizes,
    # taken from the matching skip, exactly as the network's own forward does.
    factor = 2 ** (len(unet.up_blocks) - 1)
    explicit = any(s % factor for s in head_skips[0].shape[-2:])
    for block in unet.up_blocks[:-1]:
        n = len(block.resnets)
        res, skips = tuple(skips[-n:]), skips[:-n]
        size = skips[-1].shape[2:] if explicit else None
        if _cross(block):
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res,
                      encoder_hidden_states=states, upsample_size=size)
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=size)
    return h


def tail(unet: UNet2DConditionModel, feature: torch.Tensor, emb: torch.Tensor,
         states: torch.Tensor, *first_skips: torch.Tensor) -> torch.Tensor:
    """The last up block on the deep feature and the first skips, then the output convolution."""
    block = unet.up_blocks[-1]
    if _cross(block):
        h = block(hidden_states=feature, temb=emb, res_hidden_states_tuple=first_skips,
                  encoder_hidden_states=states)
    else:
        h = block(hidden_states=feature, temb=emb, res_hidden_states_tuple=first_skips)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


class DeepCache:
    """A UNet call (x, t, states) -> out for one generation: whole network every `interval` calls.

    Stateful by design and made fresh per generation (the samplers stay stateless): call k reuses
    the deep feature of the last call with k % interval == 0. The batch must not change between
    calls, which the shared denoising loop guarantees.
    """

    def __init__(self, unet: UNet2DConditionModel, interval: int, *, pieces: tuple[Piece, Piece,
                 Piece] | None = None):
        if not isinstance(interval, int) or interval < 1:
            raise UserInputError(f"deep cache interval must be a positive integer, got {interval!r}")
        check_supported(unet)
        self.interval = interval
        # head, deep and tail over flat tensors: eager (bound to the network) or compiled.
        self.head, self.deep, self.tail = pieces or tuple(
            functools.partial(piece, unet) for piece in (head, deep, tail))
        self.first = len(unet.up_blocks[-1].resnets)
        self.calls = 0
        self.full_calls = 0
        self.feature: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        emb, *skips = self.head(x, t, states)
        if self.calls % self.interval == 0:
            self.feature = self.deep(emb, states, *skips)
            self.full_calls += 1
        self.calls += 1
        return self.tail(self.feature, emb, states, *skips[:self.first])
