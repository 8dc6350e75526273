"""A model in diffusers naming, independent of the file it came from, and its shape check.

Every conversion goes file -> ``ModelState`` -> file. The state holds the three networks' tensors
under diffusers/transformers names plus the configs a diffusers folder stores beside them, so the
writers never need to know what the reader was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..tokenizer import PadMode
from .errors import CheckpointError
from .keys_text import TextLayout

COMPONENTS = ("unet", "vae", "text_encoder")


@dataclass
class ModelState:
    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor]
    unet_config: dict                  # the content of unet/config.json
    vae_config: dict                   # vae/config.json
    text_config: dict                  # text_encoder/config.json
    scheduler_config: dict             # scheduler/scheduler_config.json
    tokenizer_pad: PadMode
    # How the text encoder is laid out in a single file: OpenAI CLIP (SD-1) or OpenCLIP (SD-2).
    text_layout: TextLayout
    family: str
    # One line per thing the user should know: tensors dropped, values assumed.
    notes: list[str] = field(default_factory=list)

    def weights(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        for name in COMPONENTS:
            yield name, getattr(self, name)

    def replace(self, **changes) -> "ModelState":
        return dataclasses.replace(self, **changes)


def meta_networks(state: ModelState) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """The three networks of the state's configs on the meta device: shapes without memory."""
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(state.unet_config)
            vae = AutoencoderKL.from_config(state.vae_config)
            text = CLIPTextModel(CLIPTextConfig.from_dict(state.text_config))
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(
            f"the model's configs do not describe a buildable network: {e}") from e
    return unet, vae, text


def check_shapes(state: ModelState, source: str) -> None:
    """Every tensor the configs' networks need is present with the right shape, and nothing else.

    This is what turns a wrong guess about the architecture (or a damaged file) into one clear
    message before anything is written, instead of a load failure later.
    """
    for (name, weights), net in zip(state.weights(), meta_networks(state)):
        want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        missing = sorted(set(want) - set(weights))
        extra = sorted(set(weights) - set(want))
        wrong = [f"{k} {tuple(weights[k].shape)} (expected {want[k]})"
                 for k in sorted(set(want) & set(weights)) if tuple(weights[k].shape) != want[k]]
        # Every weight of these networks is floating point; an integer one is a damaged dtype
        # field (F32 -> I32 is a one-byte change that keeps the size).
        wrong += [f"{k} of dtype {weights[k].dtype}" for k in sorted(weights)
                  if not weights[k].is_floating_point()]
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
        if extra:
            problems.append(f"{len(extra)} unexpected tensors, e.g. {', '.join(extra[:3])}")
        if wrong:
            problems.append(
                f"{len(wrong)} of the wrong shape or dtype, e.g. {'; '.join(wrong[:2])}")
        if problems:
            raise CheckpointError(f"{source}: the {name} does not match its architecture "
                                  f"(family {state.family}): {'; '.join(problems)}")


def cast_weights(weights: dict[str, torch.Tensor],
                 dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating tensors cast to dtype (integer buffers keep theirs); contiguous, ready to write.

    safetensors refuses two names for one storage, so a tensor sharing memory with one already
    taken (tied weights in a pickle, a view) is copied.
    """
    out: dict[str, torch.Tensor] = {}
    taken: set[tuple[int, int]] = set()
    for key, value in weights.items():
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        value = value.contiguous()
        span = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
        if value.numel() and span in taken:
            value = value.clone()
        elif value.numel():
            taken.add(span)
        out[key] = value
    return out
