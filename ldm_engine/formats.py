"""Reading weight files defensively: a bad file is reported by name before any tensor is touched."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from .errors import ModelFolderError

# A safetensors file is: u64 little-endian header length N, N bytes of JSON, then the raw buffer.
# Headers of real checkpoints are a few hundred KiB; 100 MiB is the library's own upper bound.
_MAX_HEADER = 100 * 1024 * 1024
_LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
# Bytes per element of the safetensors dtypes torch can hold (sub-byte float formats excluded).
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
               "C64": 8}


class _BadHeader(ValueError):
    """Internal: why a header is malformed; reported as one "not a valid safetensors file" line."""


# safetensors stores sizes and offsets as u64; any larger number is malformed, and refusing it
# before int() also keeps a 100 MiB header of digits from costing quadratic time to convert.
_MAX_U64 = 2**64 - 1
_MAX_INT_DIGITS = len(str(_MAX_U64))


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise _BadHeader(f"an integer of {len(text)} digits")
    return int(text)


def _parse_constant(text: str) -> float:
    raise _BadHeader(f"{text} is not JSON")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    # json.loads keeps the last of repeated keys silently; safetensors' own parser and other
    # tools may keep another, so a file with two answers for one name is refused.
    out = {}
    for key, value in pairs:
        if key in out:
            raise _BadHeader(f"key {key!r} appears twice")
        out[key] = value
    return out


def _parse_header(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadHeader(f"the header is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_int=_parse_int,
                            parse_constant=_parse_constant)
    except json.JSONDecodeError as e:
        raise _BadHeader(f"the header is not JSON ({e.msg} at character {e.pos})") from None
    except RecursionError:
        raise _BadHeader("the header is nested too deeply") from None
    except ValueError as e:  # _BadHeader, or anything else json's number parsing raises
        raise _BadHeader(str(e)[:200] or "the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _BadHeader(f"the header is a JSON {type(header).__name__}, not an object")
    return header


def check_safetensors(path: str | os.PathLike) -> dict:
    """Validate a safetensors file's framing and header; return the parsed header.

    Catches what users actually hit: zero-byte or truncated downloads, a git-LFS pointer checked out
    instead of the weights, and files that are not safetensors at all -- with a message naming the
    file, instead of a deep Rust error from the loader. Every malformed header (wrong JSON types,
    repeated keys, numbers beyond u64, offsets that overlap, leave gaps or run past the end) gets
    one error: "PATH is not a valid safetensors file: REASON".
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
        header = _parse_header(raw)
        _check_header(header, size - 8 - n)
    except _BadHeader as e:
        raise ModelFolderError(f"{path} is not a valid safetensors file: {e}") from None
    return header


def _check_header(header: dict, data_len: int) -> None:
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _BadHeader("__metadata__ must map names to strings")
    spans = []
    for name, info in header.items():
        if name != "__metadata__":
            spans.append((*_tensor_span(name, info, data_len), name))
    # The loader requires the tensors to tile the buffer exactly: no overlap, no gap, no tail.
    spans.sort()
    end = 0
    for start, stop, name in spans:
        if start < end:
            raise _BadHeader(f"tensor {name!r} overlaps the tensor before it in the file")
        if start > end:
            raise _BadHeader(f"unused bytes {end}..{start} before tensor {name!r}")
        end = stop
    if end != data_len:
        raise _BadHeader(f"the tensors cover {end} of the {data_len} data bytes")


def _tensor_span(name: str, info: object, data_len: int) -> tuple[int, int]:
    """Validate one header entry (types first, then dtype, shape and offsets agree): its span."""
    if not isinstance(info, dict):
        raise _BadHeader(f"header entry {name!r} is a JSON {_json_type(info)}, not an object")
    offsets = info.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_index, offsets))):
        raise _BadHeader(f"tensor {name!r} has invalid data_offsets {_short(offsets)} "
                         "(want [start, end], integers >= 0)")
    start, end = offsets
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(map(_is_index, shape)):
        raise _BadHeader(f"tensor {name!r} has an invalid shape {_short(shape)}")
    dtype = info.get("dtype")
    itemsize = DTYPE_SIZES.get(dtype) if isinstance(dtype, str) else None
    if itemsize is None:
        raise _BadHeader(f"tensor {name!r} has an unsupported dtype {_short(dtype)}")
    if not start <= end <= data_len:
        raise _BadHeader(f"tensor {name!r} spans bytes {start}..{end} of a {data_len}-byte "
                         "buffer (the file is truncated or the header corrupt)")
    nbytes = _nbytes(shape, itemsize, limit=data_len)
    if end - start != nbytes:
        raise _BadHeader(f"tensor {name!r} has {end - start} bytes, but shape {_short(shape)} of "
                         f"{dtype} needs {nbytes if nbytes <= data_len else 'more'}")
    return start, end


def _nbytes(shape: list[int], itemsize: int, *, limit: int) -> int:
    """Bytes of a tensor of this shape, or limit + 1 once it is known to exceed limit (a shape of
    many huge dimensions would otherwise make a product with millions of digits)."""
    if 0 in shape:
        return 0
    n = itemsize
    for d in shape:
        n *= d
        if n > limit:
            return limit + 1
    return n


def _is_index(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_U64


def _json_type(v: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _short(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# Every dtype check_safetensors accepts (DTYPE_SIZES), so a valid file always reads.
_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                 "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                 "BOOL": "bool", "U16": "uint16", "U32": "uint32", "U64": "uint64",
                 "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "C64": "complex64"}


def read_safetensors(path: str | os.PathLike, dtype=None, *, channels_last: bool = False) -> dict:
    """All tensors of a (checked) safetensors file, floating-point ones cast to dtype as read.

    Plain reads, one tensor at a time, rather than a memory map: mapped file pages count in the
    process's RSS while mapped, so loading an fp32 file into bf16 through a map peaks at the fp32
    file plus the bf16 model. Here the peak is the model in its final dtype plus one tensor.

    The tensors share one anonymous mapping advised for transparent huge pages. Weights on 4 KiB
    pages cost the SD-1.5 UNet a fifth of its fp32 speed on these CPUs (2.07 s vs 1.69 s a step;
    the kernel here gives huge pages only where asked, THP "madvise"), from TLB misses as the
    matmuls stream through 3.4 GB of weights. With channels_last, 4-D floating-point tensors are
    laid out channels-last in place, so a later `.to(memory_format=...)` copies nothing.
    """
    import mmap

    import torch

    path = Path(path)
    header = check_safetensors(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    entries = [(name, info) for name, info in header.items() if name != "__metadata__"]
    for name, info in entries:
        if info["dtype"] not in _TORCH_DTYPES:
            raise ModelFolderError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")

    def target(info) -> "torch.dtype":
        source = getattr(torch, _TORCH_DTYPES[info["dtype"]])
        return dtype if dtype is not None and source.is_floating_point else source

    # Each tensor starts on a 64-byte boundary (the widest vector load).
    offsets, total = [], 0
    for _, info in entries:
        offsets.append(total)
        size = math.prod(info["shape"]) * target(info).itemsize
        total += -(-size // 64) * 64
    # Private: Python's default anonymous mapping is shared memory, which THP "madvise" skips.
    arena = mmap.mmap(-1, max(total, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        arena.madvise(mmap.MADV_HUGEPAGE)
    tensors = {}
    with open(path, "rb", buffering=0) as f:
        for (name, info), offset in zip(entries, offsets):
            start, stop = info["data_offsets"]
            source = getattr(torch, _TORCH_DTYPES[info["dtype"]])
            out_dtype, shape = target(info), info["shape"]
            numel = math.prod(shape)
            out = torch.frombuffer(arena, dtype=out_dtype, count=numel, offset=offset) \
                if numel else torch.empty(0, dtype=out_dtype)
            if channels_last and len(shape) == 4 and out_dtype.is_floating_point:
                b, c, h, w = shape
                out = out.as_strided(shape, (h * w * c, 1, w * c, c))
            else:
                out = out.reshape(shape)
            f.seek(8 + n + start)
            if out_dtype == source and out.is_contiguous():
                got = f.readinto(out.view(-1).view(torch.uint8).numpy()) if numel else 0
            else:
                raw = torch.empty(stop - start, dtype=torch.uint8)
                got = f.readinto(raw.numpy())
                out.copy_(raw.view(source).reshape(shape))
            if got != stop - start:
                raise ModelFolderError(f"{path} is truncated inside tensor {name!r}")
            tensors[name] = out
    return tensors
