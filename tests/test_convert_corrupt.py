"""Damaged input of every kind ends in one clear ModelFolderError/UserInputError.

Never a crash, a hang (each case runs under an alarm) or a raw library exception, and never a
partly written destination.
"""

import io
import json
import struct
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ldm_engine.apps.cli import main
from ldm_engine.convert import convert
from ldm_engine.errors import ModelFolderError, UserInputError
from ldm_engine.inspection import inspect_path

DEADLINE_SECONDS = 20


# A hang (e.g. a product of huge dimensions computed in full) is a failure: see conftest.
pytestmark = pytest.mark.usefixtures("deadline")


@pytest.fixture(scope="module")
def good_files(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    convert(tiny_dir, root / "tiny.safetensors")
    convert(tiny_dir, root / "tiny.ckpt")
    return {"safetensors": (root / "tiny.safetensors").read_bytes(),
            "ckpt": (root / "tiny.ckpt").read_bytes()}


def assert_clear_error(path: Path, tmp_path: Path) -> str:
    """convert and inspect both fail with a user-input error; nothing is written."""
    out = tmp_path / "out"
    with pytest.raises(UserInputError) as info:
        convert(path, out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]    # no temp left
    with pytest.raises(UserInputError):
        inspect_path(path)
    message = str(info.value)
    assert str(path) in message or path.name in message
    return message


def offsets(size: int, n: int = 30) -> list[int]:
    """n cut points spread over the file, always including the first bytes and the last one."""
    points = {0, 1, 7, 8, 9, size - 1} | {size * k // n for k in range(1, n)}
    return sorted(p for p in points if 0 <= p < size)


@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
def test_truncated_at_many_offsets(kind, good_files, tmp_path):
    data = good_files[kind]
    cuts = offsets(len(data))
    assert len(cuts) >= 30
    for cut in cuts:
        path = tmp_path / f"cut{cut}.{kind}"
        path.write_bytes(data[:cut])
        message = assert_clear_error(path, tmp_path)
        assert any(w in message for w in ("truncated", "empty", "damaged", "not a", "corrupt")), message
        path.unlink()


def test_every_flipped_header_byte_is_caught(good_files, tmp_path):
    data = good_files["safetensors"]
    (n,) = struct.unpack("<Q", data[:8])
    # Every byte of the length field, and 40 positions across the JSON header.
    positions = list(range(8)) + [8 + n * k // 40 for k in range(40)]
    for pos in positions:
        corrupt = bytearray(data)
        corrupt[pos] ^= 0xFF               # an ASCII header byte becomes invalid UTF-8
        path = tmp_path / f"flip{pos}.safetensors"
        path.write_bytes(bytes(corrupt))
        assert_clear_error(path, tmp_path)
        path.unlink()


def safetensors_bytes(header: object, body: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_HEADERS = {
    "not json": safetensors_bytes(b"{this is not json", bytes(8)),
    "json array": safetensors_bytes([1, 2, 3], bytes(8)),
    "json string": safetensors_bytes("weights", bytes(8)),
    "deeply nested": safetensors_bytes(b"[" * 100_000 + b"]" * 100_000),
    "no offsets": safetensors_bytes({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)),
    "offsets as text": safetensors_bytes({"a": {**F32, "data_offsets": ["0", "8"]}}, bytes(8)),
    "negative shape": safetensors_bytes({"a": {**F32, "shape": [-2]}}, bytes(8)),
    "unknown dtype": safetensors_bytes({"a": {**F32, "dtype": "F31"}}, bytes(8)),
    "shape vs size": safetensors_bytes({"a": {**F32, "shape": [3]}}, bytes(8)),
    "entry not object": safetensors_bytes({"a": 5}, bytes(8)),
    "metadata not strings": safetensors_bytes({"__metadata__": {"a": 1}, "a": F32}, bytes(8)),
    "overlapping": safetensors_bytes({"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, bytes(12)),
    "same span twice": safetensors_bytes({"a": F32, "b": F32}, bytes(8)),
    "gap": safetensors_bytes({"a": {**F32, "data_offsets": [4, 12]}}, bytes(12)),
    "trailing bytes": safetensors_bytes({"a": F32}, bytes(16)),
    "past the end": safetensors_bytes({"a": {**F32, "shape": [4], "data_offsets": [0, 16]}}, bytes(8)),
    "huge length": safetensors_bytes({"a": F32}, bytes(8), length=2**63),
    "length 1 TiB": safetensors_bytes({"a": F32}, bytes(8), length=2**40),
    "length beyond file": safetensors_bytes({"a": F32}, bytes(8), length=10_000),
    "zero length": safetensors_bytes(b"", bytes(8)),
    "non-utf8 header": safetensors_bytes(b'{"a\xff": 1}', bytes(8)),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_bad_safetensors_headers(case, tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(BAD_HEADERS[case])
    assert_clear_error(path, tmp_path)


NOT_WEIGHTS = {
    "empty": b"",
    "lfs pointer": (b"version https://git-lfs.github.com/spec/v1\n"
                    b"oid sha256:4c2e1f0b8e0a1b3c5d7f9e0a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4\n"
                    b"size 4265380512\n"),
    "html error page": b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n",
    "random bytes": bytes(range(256)) * 16,
    "one byte": b"\x80",
    "legacy pickle": b"\x80\x02}q\x00.",
}


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("case", list(NOT_WEIGHTS))
def test_files_that_are_not_weights(case, suffix, tmp_path):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(NOT_WEIGHTS[case])
    message = assert_clear_error(path, tmp_path)
    if case == "lfs pointer":
        assert "git lfs pull" in message
    if case == "empty":
        assert "empty" in message


def rebuild_zip(data: bytes, path: Path, change) -> Path:
    """Rewrite a ckpt archive member by member; change(name, bytes) -> bytes or None to drop."""
    src = path.with_suffix(".src")
    src.write_bytes(data)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            content = change(info.filename, zin.read(info))
            if content is not None:
                zout.writestr(info.filename, content)
    src.unlink()
    return path


CKPT_DAMAGE = {
    "garbage pickle": lambda n, b: b"\x80\x02garbage" if n.endswith("data.pkl") else b,
    "half a pickle": lambda n, b: b[: len(b) // 2] if n.endswith("data.pkl") else b,
    "no data.pkl": lambda n, b: None if n.endswith("data.pkl") else b,
    "tensor record missing": lambda n, b: None if "/data/" in n and n.endswith("/0") else b,
    "tensor record short": lambda n, b: b[:3] if "/data/" in n and n.endswith("/0") else b,
    "pickle of a list": lambda n, b: b"\x80\x02]q\x00." if n.endswith("data.pkl") else b,
    "no tensors": lambda n, b: b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x01s." if n.endswith("data.pkl") else b,
}


@pytest.mark.parametrize("case", list(CKPT_DAMAGE))
def test_damaged_ckpt_archives(case, good_files, tmp_path):
    path = rebuild_zip(good_files["ckpt"], tmp_path / "bad.ckpt", CKPT_DAMAGE[case])
    assert_clear_error(path, tmp_path)


def test_compressed_archive_is_refused(good_files, tmp_path):
    """torch.save never compresses; a deflated member is not ours to inflate (zip bombs)."""
    src = tmp_path / "src.ckpt"
    src.write_bytes(good_files["ckpt"])
    path = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    src.unlink()
    assert "compressed" in assert_clear_error(path, tmp_path)


@pytest.mark.parametrize("flag", [0x01, 0x20, 0x40])   # encrypted, patched, strong encryption
def test_encrypted_or_patched_members_are_refused(flag, good_files, tmp_path):
    """Flag bits zipfile cannot read are named before any member is opened."""
    data = bytearray(good_files["ckpt"])
    # zipfile's writer resets flag bits, so set them in each central-directory record directly
    # (the copy zipfile reads them from): signature, then the flags at byte 8.
    eocd = data.rindex(b"PK\x05\x06")
    count, = struct.unpack_from("<H", data, eocd + 10)
    offset, = struct.unpack_from("<I", data, eocd + 16)
    for _ in range(count):
        assert data[offset:offset + 4] == b"PK\x01\x02"
        flags, = struct.unpack_from("<H", data, offset + 8)
        struct.pack_into("<H", data, offset + 8, flags | flag)
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, offset + 28)
        offset += 46 + name_len + extra_len + comment_len
    path = tmp_path / "flagged.ckpt"
    path.write_bytes(bytes(data))
    assert "encrypted or patched" in assert_clear_error(path, tmp_path)


def test_flipped_tensor_byte_in_ckpt_fails_the_zip_crc(good_files, tmp_path):
    """torch does not check the archive's CRCs; the converter does, so a flipped bit in a weight
    is reported instead of converted."""
    data = bytearray(good_files["ckpt"])
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 64)
    # The local header is 30 bytes + name + extra field; the stored tensor bytes follow.
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x10
    path = tmp_path / "flipped.ckpt"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match="damaged"):
        convert(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_valid_container_wrong_contents(tmp_path):
    torch.save({"state_dict": {"weight": torch.ones(3)}}, tmp_path / "small.ckpt")
    with pytest.raises(UserInputError, match="not a Stable Diffusion checkpoint"):
        convert(tmp_path / "small.ckpt", tmp_path / "out")
    safetensors.torch.save_file({"lora_unet_down.weight": torch.ones(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(UserInputError, match="LoRA"):
        convert(tmp_path / "lora.safetensors", tmp_path / "out")


def test_damaged_input_on_the_command_line(good_files, tmp_path, capsys):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(good_files["safetensors"][: len(good_files["safetensors"]) // 3])
    for args in (["convert", str(path), str(tmp_path / "out")], ["inspect", str(path)]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert "truncated" in err
