"""A single checkpoint file used directly as a model: converted in memory, nothing written.

``ldm generate --model model.safetensors`` and ``TextToImage.from_single_file`` read the file
through the same path as ``ldm convert`` (``load_state``: the safetensors header checks, the
allowlisting unpickler for ``.ckpt``, the shape check against the configs), then hand its tensors
to the networks instead of to a writer.

Memory: a safetensors file is memory-mapped (its pages are the kernel's file cache, not the
process's own memory) and the networks are built on the meta device (no random initialisation to
throw away). Each tensor is copied out of the map in its final dtype and layout as it is taken, so
the process's own memory peaks at the model's size (SD-1.5 from its 2.1 GB fp16 file into fp32:
4.3 GiB of anonymous memory for the 4.0 GiB model, 0.3 of it the process before loading; 4.4 GiB
from the same model as a folder). The map's file pages are released when the last tensor is
copied. A ``.ckpt`` is a pickle, necessarily read whole first: its tensors plus the model.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from schedulers import ScheduleConfig

from ..components import Components
from ..tokenizer import SDTokenizer
from . import load_state
from .detect import check_supported, infer_architecture
from .errors import CheckpointError, UnsafeCheckpointError
from .ldm_layout import decode_metadata
from .model_state import ModelState
from .single_file import read_shapes

log = logging.getLogger("ldm_engine.convert")


@contextlib.contextmanager
def _safe_unpickling_only(path: str | os.PathLike):
    """A refused pickle's message, pointing to the one command that can unpickle it fully."""
    try:
        yield
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(
            f"{e} with `ldm convert --trust-pickle {path} FOLDER`, then use FOLDER (a model used "
            "directly is never fully unpickled)") from None


def _take(weights: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
          channels_last: bool) -> dict[str, torch.Tensor]:
    """Copies of the tensors on device, floating ones cast to dtype, emptying ``weights`` as it
    goes so each source tensor can be freed as soon as its copy exists.

    Always a copy, even where the dtype already matches: safetensors hands back views of its
    memory map of the file (4 KiB file pages, which cost the SD-1.5 UNet a fifth of its fp32
    speed, and which change or fault if the file is replaced while in use). Copies made by
    torch's allocator are anonymous memory on transparent huge pages (ldm_engine/__init__.py).
    """
    out = {}
    for key in list(weights):
        value = weights.pop(key)
        layout = (torch.channels_last if channels_last and value.dim() == 4
                  and value.is_floating_point() else torch.contiguous_format)
        out[key] = value.to(device=device,
                            dtype=dtype if value.is_floating_point() else value.dtype,
                            memory_format=layout, copy=True)
    return out


def _diffusers_network(cls, config: dict, weights: dict[str, torch.Tensor]):
    with torch.device("meta"):
        model = cls.from_config(config)
    model.load_state_dict(weights, strict=True, assign=True)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{cls.__name__} has tensors no checkpoint can hold: {left[:3]}")
    return model


def components_from_state(state: ModelState, *, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32,
                          channels_last: bool = False) -> Components:
    """The networks, tokenizer and schedule of a (shape-checked) state, in eval mode.

    The UNet's and VAE's weights are copied straight to device (no model-sized copy on the CPU
    first). The state's weight dicts are emptied: their tensors now belong to the networks.
    """
    device = torch.device(device)
    try:
        schedule = ScheduleConfig.from_dict(state.scheduler_config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the model's scheduler config is unusable: {e}") from None
    unet = _diffusers_network(UNet2DConditionModel, state.unet_config,
                              _take(state.unet, device, dtype, channels_last))
    vae = _diffusers_network(AutoencoderKL, state.vae_config,
                             _take(state.vae, device, dtype, channels_last))
    # transformers' own loader: it also creates CLIP's non-persistent position_ids buffer. Built
    # on the CPU and then moved (SD-1.5's is 123M of its 1.07B parameters).
    transformers.utils.logging.disable_progress_bar()
    text_encoder = CLIPTextModel.from_pretrained(
        None, config=CLIPTextConfig.from_dict(state.text_config), dtype=dtype,
        state_dict=_take(state.text_encoder, torch.device("cpu"), dtype, False))
    tokenizer = SDTokenizer.from_bpe(pad=state.tokenizer_pad)
    components = Components(unet, vae, text_encoder, tokenizer, schedule)
    return components.to(device=device).eval()


def load_single_file(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, channels_last: bool = False,
                     family: str | None = None, prediction: str | None = None) -> Components:
    """A ``.safetensors``/``.ckpt`` SD-1.x/2.x checkpoint as Components (eval mode, on device).

    family/prediction: as ``ldm convert --family/--prediction``, for files whose configs must be
    inferred. Pickles are only ever read with the safe unpickler (``ldm convert --trust-pickle``
    is the way to use a trusted file that needs more).
    """
    with _safe_unpickling_only(path):
        state = load_state(path, family=family, prediction=prediction)
    for note in state.notes:
        log.info("%s: %s", path, note)
    return components_from_state(state, device=device, dtype=dtype, channels_last=channels_last)


def single_file_vae_factor(path: str | os.PathLike) -> int:
    """The VAE's spatial factor of a single file without reading its tensors (a safetensors file's
    header only: our ``ldm_engine.*`` metadata if present, else inferred from the shapes; a
    ``.ckpt`` must be unpickled whole to see its shapes)."""
    source = str(path)
    with _safe_unpickling_only(path):
        _, entries, metadata, _ = read_shapes(path)
    meta = decode_metadata(metadata, source)
    if meta is not None:
        blocks = meta["vae_config"].get("block_out_channels")
        if not isinstance(blocks, list) or not blocks:
            raise CheckpointError(f"{source}: damaged ldm_engine metadata (the VAE config's "
                                  f"block_out_channels is {blocks!r})")
        return 2 ** (len(blocks) - 1)
    layout = check_supported(entries, source)
    shapes = {k: shape for k, (shape, _) in entries.items()}
    return infer_architecture(shapes, layout, source).vae.downsample_factor


__all__ = ["components_from_state", "load_single_file", "single_file_vae_factor"]
