"""The zip container of a ``torch.save`` checkpoint: checked structure, CRC-checked records.

``torch.save`` (>= 1.6) writes a zip archive ``NAME/data.pkl`` (the pickle), ``NAME/data/K`` (the
raw bytes of storage K), ``NAME/byteorder`` and a few version records, all stored uncompressed.
torch reads it with its own zip reader (miniz), which checks no CRC and reads the central
directory differently from Python's ``zipfile`` in corners a crafted file can reach: a member whose
central entry has the MS-DOS directory attribute (0x10) passes zipfile's CRC check, but miniz then
treats it as a directory, copies nothing, and torch builds the tensor on uninitialised memory.

So two rules here:

1. Refuse any archive whose members two readers could disagree on: directory bits, duplicate
   names, a local header that disagrees with its central entry (name, method, CRC, sizes, data
   descriptor), data before the first member or regions that overlap.
2. Never let torch's reader supply the bytes. The unpickler's ``persistent_load`` is served from
   ``zipfile`` reads of the ``data/K`` records, each read whole and CRC-checked, with its length
   equal to what the tensor needs (`CheckpointArchive.storage`). The bytes that become tensors are
   exactly the bytes that were checked, whatever rule 1 might miss.
"""

from __future__ import annotations

import stat
import struct
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError

_LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
_ZIP_LOCAL_HEADER = b"PK\x03\x04"
_DATA_DESCRIPTOR = b"PK\x07\x08"
# What zipfile raises for damaged archives (truncation, bad offsets, bad CRCs).
ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError)
# General-purpose flag bits torch.save never sets: encrypted (0), compressed patch data (5),
# strong encryption (6). Bit 3 (sizes in a data descriptor after the data) it always sets.
_UNSUPPORTED_FLAGS = 0x61
_FLAG_DESCRIPTOR = 0x08
_FLAG_UTF8 = 0x800
_MSDOS_DIRECTORY = 0x10
_ZIP64_EXTRA = 0x0001
_U32_MAX = 0xFFFFFFFF
# Local file header: signature, version, flags, method, time, date, crc, sizes, name/extra length.
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_CHUNK = 1 << 24


@dataclass
class CheckpointArchive:
    """An open, structurally checked torch zip checkpoint."""

    path: Path
    zip: zipfile.ZipFile
    prefix: str                     # "NAME/" that torch.save put every record under
    _storages: dict = field(default_factory=dict)

    def read(self, name: str) -> bytes:
        """A small record (CRC-checked), by its name under the prefix."""
        try:
            return self.zip.read(self.prefix + name)
        except KeyError:
            raise CheckpointError(f"{self.path} is damaged: record {self.prefix + name} is "
                                  "missing") from None
        except ZIP_ERRORS as e:
            raise CheckpointError(f"{self.path} is damaged: {e}") from None

    def has(self, name: str) -> bool:
        return self.prefix + name in self.zip.NameToInfo

    def storage(self, key: str, nbytes: int) -> torch.UntypedStorage:
        """The bytes of record data/KEY as a CPU storage: read whole through zipfile, so its CRC
        is checked, and refused unless it holds exactly nbytes."""
        name = f"{self.prefix}data/{key}"
        try:
            info = self.zip.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{self.path} is damaged: tensor record {name} is "
                                  "missing") from None
        if info.file_size != nbytes:
            raise CheckpointError(f"{self.path} is damaged: tensor record {name} holds "
                                  f"{info.file_size} bytes, its tensor needs {nbytes}")
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        try:
            with self.zip.open(info) as member:
                pos = 0
                while pos < nbytes:
                    chunk = member.read(min(_CHUNK, nbytes - pos))
                    if not chunk:
                        break
                    view[pos:pos + len(chunk)] = chunk
                    pos += len(chunk)
                # Reading to the end is what makes zipfile compare the CRC.
                short = pos != nbytes or member.read(1)
        except ZIP_ERRORS as e:
            raise CheckpointError(f"{self.path} is damaged: {e}") from None
        if short:
            raise CheckpointError(f"{self.path} is damaged: tensor record {name} is not the "
                                  "size its directory entry says")
        return buf.untyped_storage()

    def typed_storage(self, storage_type: object, key: object, numel: object
                      ) -> torch.storage.TypedStorage:
        """What torch's persistent_load returns for ('storage', type, key, location, numel);
        storages shared by several tensors (views) are read once."""
        dtype = torch.uint8 if storage_type is torch.UntypedStorage \
            else getattr(storage_type, "dtype", None)
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str) \
                or not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise CheckpointError(f"{self.path} holds a damaged pickle: bad storage reference "
                                  f"{str((storage_type, key, numel))[:80]}")
        if key not in self._storages:
            storage = self.storage(key, numel * dtype.itemsize)
            if self._byteorder() != sys.byteorder:
                storage.byteswap(dtype)
            self._storages[key] = torch.storage.TypedStorage(
                wrap_storage=storage, dtype=dtype, _internal=True)
        return self._storages[key]

    def _byteorder(self) -> str:
        if not self.has("byteorder"):
            return "little"                   # torch's default for files without the record
        order = self.read("byteorder")
        if order not in (b"little", b"big"):
            raise CheckpointError(f"{self.path} is damaged: unknown byte order {order[:20]!r}")
        return order.decode()

    def close(self) -> None:
        self.zip.close()


def open_checkpoint(path: Path) -> CheckpointArchive | None:
    """Framing and structure checks before any record is used; None: a legacy (pre-1.6) pickle
    stream, which ckpt.py reads with torch's legacy loader (weights_only)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy did not finish")
    with open(path, "rb") as f:
        head = f.read(len(_LFS_POINTER_PREFIX))
    if head.startswith(_LFS_POINTER_PREFIX):
        raise CheckpointError(
            f"{path} is a git-LFS pointer, not the weights: run `git lfs pull` in its repository")
    try:
        archive = zipfile.ZipFile(path)
    except ZIP_ERRORS as e:
        if head.startswith(_ZIP_LOCAL_HEADER):
            raise CheckpointError(
                f"{path} is truncated or damaged: its zip directory cannot be read ({e})") from None
        if head[:1] == b"\x80":
            return None
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (.ckpt/.pt written by torch.save)") from None
    try:
        prefix = _check_members(path, archive)
        _check_layout(path, archive)
    except CheckpointError:             # (a ValueError too: before ZIP_ERRORS)
        archive.close()
        raise
    except ZIP_ERRORS as e:
        archive.close()
        raise CheckpointError(f"{path} is damaged: {e}") from None
    return CheckpointArchive(path, archive, prefix)


def _check_members(path: Path, archive: zipfile.ZipFile) -> str:
    """What the central directory says, member by member; returns the record prefix."""
    infos = archive.infolist()
    pickles = [i.filename for i in infos
               if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise CheckpointError(f"{path} is a zip archive but not a PyTorch checkpoint (no data.pkl)")
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise CheckpointError(f"{path} is damaged or crafted: member {twice} appears twice")
    for info in infos:
        # torch.save stores records uncompressed; a compressed member could also be a zip bomb.
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{path} is not a PyTorch checkpoint: {info.filename} is "
                                  "compressed")
        if info.flag_bits & _UNSUPPORTED_FLAGS:
            raise CheckpointError(f"{path} is damaged or not a PyTorch checkpoint: "
                                  f"{info.filename} is marked encrypted or patched")
        if info.is_dir() or info.external_attr & _MSDOS_DIRECTORY \
                or stat.S_ISDIR(info.external_attr >> 16):
            raise CheckpointError(f"{path} is damaged or crafted: member {info.filename} is "
                                  "marked as a directory (torch would read no data for it)")
        if info.compress_size != info.file_size:
            raise CheckpointError(f"{path} is damaged: stored member {info.filename} has "
                                  f"{info.compress_size} bytes but claims {info.file_size}")
    return pickles[0].removesuffix("data.pkl")


def _check_layout(path: Path, archive: zipfile.ZipFile) -> None:
    """Each member's local header agrees with its central entry, and the members' regions start
    at byte 0, do not overlap and end before the central directory: one reading of the file."""
    end = 0
    with open(path, "rb") as f:
        for info in sorted(archive.infolist(), key=lambda i: i.header_offset):
            if info.header_offset < end or (end == 0 and info.header_offset != 0):
                raise CheckpointError(f"{path} is damaged or crafted: member {info.filename} "
                                      f"starts at byte {info.header_offset}, expected {end}"
                                      if end else f"{path} has data before its first member")
            end = _check_local(path, f, info)
    if end > archive.start_dir:
        raise CheckpointError(f"{path} is damaged or crafted: its members overlap the central "
                              "directory")


def _check_local(path: Path, f, info: zipfile.ZipInfo) -> int:
    """Compare one local header (and data descriptor) with the central entry; return the byte
    after the member."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path} is damaged or crafted: the local header of "
                               f"{info.filename} disagrees with the zip directory ({what})")

    f.seek(info.header_offset)
    raw = f.read(_LOCAL.size)
    if len(raw) != _LOCAL.size:
        raise bad("truncated")
    sig, _, flags, method, _, _, crc, csize, usize, name_len, extra_len = _LOCAL.unpack(raw)
    if sig != _ZIP_LOCAL_HEADER:
        raise bad("no local header where the directory points")
    name = f.read(name_len)
    extra = f.read(extra_len)
    encoding = "utf-8" if info.flag_bits & _FLAG_UTF8 else "cp437"
    if name != info.orig_filename.encode(encoding):
        raise bad(f"local name {name[:60]!r}")
    if method != info.compress_type or (flags ^ info.flag_bits) & (_FLAG_DESCRIPTOR | 0x61):
        raise bad("method or flags")
    data_end = info.header_offset + _LOCAL.size + name_len + extra_len + info.compress_size
    if flags & _FLAG_DESCRIPTOR:
        # Sizes follow the data; the local fields are zero or (some writers) already right.
        if crc not in (0, info.CRC) or csize not in (0, _U32_MAX, info.compress_size) \
                or usize not in (0, _U32_MAX, info.file_size):
            raise bad("CRC or sizes")
        return data_end + _descriptor_length(f, data_end, info, bad)
    if usize == _U32_MAX or csize == _U32_MAX:
        usize, csize = _zip64_sizes(extra, usize, csize)
    if (crc, csize, usize) != (info.CRC, info.compress_size, info.file_size):
        raise bad("CRC or sizes")
    return data_end


def _descriptor_length(f, at: int, info: zipfile.ZipInfo, bad) -> int:
    """Length of the data descriptor at `at` (optional signature, CRC, 4- or 8-byte sizes),
    which must repeat the central entry's values."""
    f.seek(at)
    raw = f.read(24)
    sig = 4 if raw[:4] == _DATA_DESCRIPTOR else 0
    for width, fmt in ((4, "<III"), (8, "<IQQ")):
        size = 4 + 2 * width
        if len(raw) >= sig + size and \
                struct.unpack_from(fmt, raw, sig) == (info.CRC, info.compress_size, info.file_size):
            return sig + size
    raise bad("data descriptor")


def _zip64_sizes(extra: bytes, usize: int, csize: int) -> tuple[int, int]:
    """The 8-byte sizes a zip64 extra field carries for fields set to 0xFFFFFFFF."""
    pos = 0
    while pos + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4:pos + 4 + length]
        if kind == _ZIP64_EXTRA:
            values = [v for (v,) in struct.iter_unpack("<Q", body[:len(body) // 8 * 8])]
            if usize == _U32_MAX and values:
                usize = values.pop(0)
            if csize == _U32_MAX and values:
                csize = values.pop(0)
            break
        pos += 4 + length
    return usize, csize
