"""Reading weight files defensively: a bad file is reported by name before any tensor is touched."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .errors import ModelFolderError

# A safetensors file is: u64 little-endian header length N, N bytes of JSON, then the raw buffer.
# Headers of real checkpoints are a few hundred KiB; 100 MiB is the library's own upper bound.
_MAX_HEADER = 100 * 1024 * 1024
_LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"


def check_safetensors(path: str | os.PathLike) -> dict:
    """Validate a safetensors file's framing and return its parsed header.

    Catches what users actually hit: zero-byte or truncated downloads, a git-LFS pointer checked out
    instead of the weights, and files that are not safetensors at all -- with a message naming the
    file, instead of a deep Rust error from the loader.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ModelFolderError(f"missing weights file: {path}") from None
    with open(path, "rb") as f:
        head = f.read(8)
        if head.startswith(b"vers") and (head + f.read(64)).startswith(_LFS_POINTER_PREFIX):
            raise ModelFolderError(
                f"{path} is a git-LFS pointer, not the weights: run `git lfs pull` in its repository")
        if size == 0:
            raise ModelFolderError(f"{path} is empty (0 bytes): the download or copy did not finish")
        if len(head) < 8:
            raise ModelFolderError(f"{path} is truncated ({size} bytes): not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise ModelFolderError(
                f"{path} is not a valid safetensors file (header length {n} exceeds file size {size});"
                " it may be truncated or in another format")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path} has a corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ModelFolderError(f"{path} has a corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(v) for v in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise ModelFolderError(f"{path}: tensor {name!r} has no valid data_offsets") from None
        if not 0 <= start <= end <= data_len:
            raise ModelFolderError(
                f"{path} is truncated: tensor {name!r} ends at byte {end} of a {data_len}-byte buffer")
        spans.append((start, end, name))
    spans.sort()
    for (s0, e0, a), (s1, e1, b) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ModelFolderError(f"{path}: tensors {a!r} and {b!r} overlap in the file")
    return header
