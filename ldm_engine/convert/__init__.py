"""Checkpoint conversion between diffusers folders and single files, for SD-1.x and SD-2.x.

    convert("v1-5-pruned.safetensors", "models/v1-5")      # single file -> diffusers folder
    convert("models/v1-5", "v1-5.safetensors", dtype="fp16")  # folder -> single file

Every conversion reads the source into a ``ModelState`` (diffusers names), checks every tensor's
shape against the networks its configs describe, and writes the destination atomically with a
bit-for-bit read-back. Nothing here touches the network.

Modules, in the order data flows through them:

* ``ckpt``         -- ``.ckpt`` loading through torch's weights_only unpickler with an allowlist.
* ``torch_zip``    -- the ``.ckpt`` zip container: structure checks, CRC-checked tensor records.
* ``single_file``  -- reading and writing ``.safetensors``/``.ckpt``, with read-back verification.
* ``detect``       -- from key names and shapes: supported or not, text layout, architecture.
* ``keys_unet``, ``keys_vae``, ``keys_text`` -- the name (and shape) mapping of each network.
* ``ldm_layout``   -- a whole model between the single-file dict and ``ModelState``; metadata.
* ``folder``       -- diffusers folders as ``ModelState``, read and written.
* ``latent_scale`` -- a single file gets the family's standard VAE scaling factor, the model's own
  folded into the VAE weights, so tools that assume the standard decode it right.
* ``to_components`` -- a single file as in-memory networks (``ldm generate --model file``).
* ``model_state``  -- the ``ModelState`` container and its shape check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..configs import FAMILIES
from ..errors import UserInputError
from .folder import read_folder, write_folder
from .latent_scale import with_standard_scaling
from .ldm_layout import PREDICTIONS, encode_metadata, state_from_ldm, state_to_ldm
from .model_state import ModelState, cast_weights, check_shapes
from .single_file import (CKPT_SUFFIXES, SAFETENSORS_SUFFIXES, FileKind, file_kind,
                          read_single_file, write_single_file)

OutputKind = Literal["diffusers", "single-file"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ConversionReport:
    source: Path
    dest: Path
    source_kind: str            # "diffusers folder", "safetensors file", "ckpt file"
    dest_kind: str
    family: str
    prediction_type: str
    notes: tuple[str, ...]      # what was dropped or assumed on the way


def _describe(kind: str) -> str:
    return "diffusers folder" if kind == "diffusers" else f"{kind} file"


def output_kind(dst: Path, to: OutputKind | None) -> tuple[OutputKind, FileKind | None]:
    """``--to`` if given, else the destination's name: .safetensors/.ckpt -> a single file."""
    suffix = dst.suffix.lower()
    named_file = suffix in SAFETENSORS_SUFFIXES + CKPT_SUFFIXES
    if to is None:
        to = "single-file" if named_file else "diffusers"
    if to == "single-file":
        if not named_file:
            raise UserInputError(f"a single-file destination needs a .safetensors or .ckpt name, "
                                 f"got {dst.name!r}")
        return to, "safetensors" if suffix in SAFETENSORS_SUFFIXES else "ckpt"
    if to != "diffusers":
        raise UserInputError(f"--to must be diffusers or single-file, got {to!r}")
    if named_file:
        raise UserInputError(
            f"--to diffusers writes a folder, but {dst.name!r} is named like a file")
    return to, None


def load_state(src: str | os.PathLike, *, ema: bool = False, family: str | None = None,
               prediction: str | None = None, trust_pickle: bool = False) -> ModelState:
    """Any supported input as a ``ModelState`` (diffusers names), shapes checked."""
    src = Path(src)
    if family is not None and family not in FAMILIES:
        raise UserInputError(f"unknown family {family!r}; valid families: {', '.join(FAMILIES)}")
    if prediction is not None and prediction not in PREDICTIONS:
        raise UserInputError(f"--prediction must be eps or v, got {prediction!r}")
    if src.is_dir():
        if ema:
            raise UserInputError("--ema selects a single file's EMA weights; a diffusers folder "
                                 "holds one set of weights")
        state = read_folder(src, family=family)
        if prediction is not None:
            state.scheduler_config = {**state.scheduler_config,
                                      "prediction_type": PREDICTIONS[prediction]}
    else:
        sf = read_single_file(src, trust_pickle=trust_pickle)
        state = state_from_ldm(sf.tensors, sf.metadata, sf.extras, str(src), ema=ema,
                               family=family, prediction=prediction)
        state.notes.extend(sf.notes)                # e.g. tensors holding NaN or inf
    check_shapes(state, str(src))
    return state


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: OutputKind | None = None,
            dtype: str | None = None, ema: bool = False, family: str | None = None,
            prediction: str | None = None, trust_pickle: bool = False,
            overwrite: bool = False) -> ConversionReport:
    """Convert ``src`` (diffusers folder, .safetensors or .ckpt) into ``dst``.

    dtype: "fp32", "fp16" or "bf16" casts every floating tensor; None keeps the source's.
    ema: take the UNet's EMA weights (``model_ema.*``) instead of the live ones.
    family: "sd1"/"sd2"/... overrides detection (and, for a folder, picks the text layout).
    prediction: "eps" or "v" overrides the recorded or assumed prediction type.
    trust_pickle: unpickle a .ckpt fully, running any code it holds (only for trusted files).
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise UserInputError(f"no such file or folder: {src}")
    if dtype is not None and dtype not in DTYPES:
        raise UserInputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out, file_format = output_kind(dst, to)
    if dst.exists() and not overwrite:
        raise UserInputError(f"{dst} already exists: pass --overwrite to replace it")
    if out == "diffusers" and dst.exists() and not dst.is_dir():
        raise UserInputError(f"{dst} is a file; a diffusers folder cannot replace it")
    if out == "single-file" and dst.is_dir():
        raise UserInputError(f"{dst} is a folder; a single file cannot replace it")
    source_kind = "diffusers" if src.is_dir() else file_kind(src)

    state = load_state(src, ema=ema, family=family, prediction=prediction,
                       trust_pickle=trust_pickle)
    cast = DTYPES[dtype] if dtype is not None else None
    if out == "diffusers":
        write_folder(state, dst, dtype=cast, overwrite=overwrite)
    else:
        # Other tools read a single file with their family's standard latent scale, not ours.
        state = with_standard_scaling(state, cast)
        write_single_file(cast_weights(state_to_ldm(state), cast), dst, encode_metadata(state),
                          file_format)
        if state.text_layout == "open_clip":
            layers = state.text_config.get("num_hidden_layers")
            state.notes.append(
                f"wrote the OpenCLIP text tower's {layers} conditioning layers and ln_final; a "
                "diffusers folder has no last (unused) layer, text_projection or logit_scale, so "
                "the file has none either (SD-2 inference never uses them)")
    return ConversionReport(src, dst, _describe(source_kind),
                            _describe(out if out == "diffusers" else file_format), state.family,
                            state.scheduler_config.get("prediction_type", "epsilon"),
                            tuple(state.notes))


__all__ = ["ConversionReport", "DTYPES", "convert", "load_state", "output_kind"]
