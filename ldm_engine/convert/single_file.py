"""Single-file checkpoints (``.safetensors``, ``.ckpt``): read defensively, written atomically.

A write goes to a temporary file beside the destination; the file is re-opened and every tensor
compared bit for bit with what was meant to be written (after the dtype cast) before it is renamed
into place. Any failure leaves the destination as it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import safetensors
import safetensors.torch
import torch

from ..formats import check_safetensors
from ..fsutil import atomic_path
from .ckpt import checkpoint_state_dict, load_pickle, save_ckpt
from .errors import CheckpointError

FileKind = Literal["safetensors", "ckpt"]
SAFETENSORS_SUFFIXES = (".safetensors",)
CKPT_SUFFIXES = (".ckpt", ".pt", ".pth")

# safetensors' names for torch dtypes, so reports read the same whatever the container.
DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
               torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass
class SingleFile:
    path: Path
    kind: FileKind
    tensors: dict[str, torch.Tensor]
    # safetensors' __metadata__, or in a ckpt the "ldm_engine" dict our writer adds
    metadata: dict[str, str] = field(default_factory=dict)
    extras: dict = field(default_factory=dict)               # a ckpt's scalars: global_step, epoch
    notes: list[str] = field(default_factory=list)           # e.g. tensors holding NaN or inf


def file_kind(path: str | os.PathLike) -> FileKind:
    """By suffix; an unknown suffix is sniffed (a zip archive is a ckpt)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in CKPT_SUFFIXES:
        return "ckpt"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    return "ckpt" if head == b"PK\x03\x04" else "safetensors"


def _open_kind(path: str | os.PathLike) -> tuple[Path, FileKind, dict | None]:
    """(path, kind, safetensors header or None), failing first on a missing or damaged file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    kind = file_kind(path)
    return path, kind, check_safetensors(path) if kind == "safetensors" else None


def read_single_file(path: str | os.PathLike, *, trust_pickle: bool = False,
                     check_finite: bool = True) -> SingleFile:
    """A single file's tensors; with check_finite, a note names any holding NaN or inf."""
    path, kind, header = _open_kind(path)
    if header is not None:
        try:
            tensors = safetensors.torch.load_file(path)
        except (safetensors.SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None
        sf = SingleFile(path, kind, tensors, metadata=dict(header.get("__metadata__", {})))
    else:
        obj = load_pickle(path, trust_pickle=trust_pickle)
        tensors, extras = checkpoint_state_dict(obj, path)
        sf = SingleFile(path, kind, tensors, metadata=extras.pop("ldm_engine", {}), extras=extras)
    if check_finite:
        sf.notes.extend(nonfinite_notes(sf.tensors))
    return sf


def nonfinite_notes(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """A note naming the floating-point tensors that hold NaN or inf, if any.

    Weights of a working model are finite; non-finite ones mean a damaged file or a run that
    diverged, and generating with them fails on non-finite latents or gives black images.
    Converting such a file is still allowed (a converter does not edit weights), never silently.
    """
    bad = [key for key, t in tensors.items()
           if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())]
    if not bad:
        return []
    return [f"{len(bad)} of {len(tensors)} tensors hold NaN or infinite values "
            f"({', '.join(sorted(bad)[:3])}{', ...' if len(bad) > 3 else ''}): the file is "
            "damaged or its training diverged; generating with it will fail or give black images"]


def read_shapes(path: str | os.PathLike, *, trust_pickle: bool = False,
                notes: list[str] | None = None
                ) -> tuple[FileKind, dict[str, tuple[tuple[int, ...], str]], dict[str, str], dict]:
    """(kind, {key: (shape, dtype name)}, metadata, extras) with as little reading as possible:
    a safetensors header only; a ckpt must be unpickled and checked whole, so for a ckpt the
    notes about its values (non-finite tensors) are appended to `notes`."""
    path, kind, header = _open_kind(path)
    if header is not None:
        entries = {k: (tuple(v["shape"]), v["dtype"])
                   for k, v in header.items() if k != "__metadata__"}
        return kind, entries, dict(header.get("__metadata__", {})), {}
    sf = read_single_file(path, trust_pickle=trust_pickle, check_finite=notes is not None)
    if notes is not None:
        notes.extend(sf.notes)
    entries = {k: (tuple(v.shape), DTYPE_NAMES.get(v.dtype, str(v.dtype).removeprefix("torch.")))
               for k, v in sf.tensors.items()}
    return kind, entries, sf.metadata, sf.extras


def _bits(t: torch.Tensor) -> torch.Tensor:
    # Compare raw bytes, so NaN payloads and -0.0 count as the values they are.
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def verify_tensors(expected: Mapping[str, torch.Tensor],
                   written: Iterator[tuple[str, torch.Tensor]], where: str) -> None:
    """Every tensor read back equals what was meant to be written: names, dtypes, shapes, bits."""
    seen = set()
    for key, got in written:
        want = expected.get(key)
        if want is None:
            raise CheckpointError(f"{where}: wrote an unexpected tensor {key}")
        same = (got.dtype == want.dtype and got.shape == want.shape
                and torch.equal(_bits(got), _bits(want)))
        if not same:
            raise CheckpointError(
                f"{where}: tensor {key} reads back different from what was written")
        seen.add(key)
    missing = set(expected) - seen
    if missing:
        raise CheckpointError(
            f"{where}: {len(missing)} tensors did not read back, e.g. {min(missing)}")


def safetensors_items(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a safetensors file one at a time (peak memory: one tensor)."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            yield key, f.get_tensor(key)


def write_single_file(tensors: Mapping[str, torch.Tensor], dest: str | os.PathLike,
                      metadata: Mapping[str, str], kind: FileKind) -> Path:
    """Write atomically and verify; ``tensors`` must already be cast and contiguous."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        if kind == "safetensors":
            safetensors.torch.save_file(dict(tensors), str(tmp), metadata=dict(metadata))
            check_safetensors(tmp)
            verify_tensors(tensors, safetensors_items(tmp), str(dest))
        else:
            save_ckpt(tensors, tmp, metadata)
            written = read_single_file(tmp, check_finite=False)
            verify_tensors(tensors, iter(written.tensors.items()), str(dest))
            if written.metadata != dict(metadata):
                raise CheckpointError(
                    f"{dest}: metadata reads back different from what was written")
    return dest
