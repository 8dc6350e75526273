""".ckpt zip containers that two zip readers would read differently, and tensors that are not
weights: refused with one line; a checkpoint whose weights hold NaN/inf is reported.

torch reads a checkpoint with its own zip reader (miniz); the converter checks the archive with
Python's zipfile. Where the two disagree (a member whose central-directory entry carries the
MS-DOS directory bit 0x10: zipfile ignores it, miniz copies nothing and torch builds the tensor
on uninitialised memory), a checked file used to load as garbage. Now such archives are refused,
and independently of that, every tensor is built from the CRC-checked bytes zipfile read.
"""

import io
import stat
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ldm_engine.apps.cli import main
from ldm_engine.convert import convert, torch_zip
from ldm_engine.convert.ckpt import load_pickle
from ldm_engine.convert.errors import CheckpointError
from ldm_engine.inspection import inspect_path

UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    convert(tiny_dir, path)
    return path


@pytest.fixture(scope="module")
def tiny_weights(tiny_dir, tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("st") / "tiny.safetensors"
    convert(tiny_dir, path)
    return safetensors.torch.load_file(str(path))


def central_entries(data: bytes):
    """(offset of the central-directory entry, member name) for every member."""
    eocd = data.rindex(b"PK\x05\x06")
    count, = struct.unpack_from("<H", data, eocd + 10)
    offset, = struct.unpack_from("<I", data, eocd + 16)
    for _ in range(count):
        assert data[offset:offset + 4] == b"PK\x01\x02"
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, offset + 28)
        yield offset, data[offset + 46:offset + 46 + name_len].decode()
        offset += 46 + name_len + extra_len + comment_len


def set_external_attr(data: bytes, bits: int, members) -> bytes:
    """OR bits into the external attributes (central entry byte 38) of the chosen members."""
    out = bytearray(data)
    for offset, name in central_entries(data):
        if members(name):
            attr, = struct.unpack_from("<I", out, offset + 38)
            struct.pack_into("<I", out, offset + 38, attr | bits)
    return bytes(out)


def local_header(data: bytes, member: str) -> int:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return z.getinfo(member).header_offset


def assert_refused(path: Path, tmp_path: Path, *words: str) -> str:
    with pytest.raises(CheckpointError) as info:
        convert(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError):
        inspect_path(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for word in words:
        assert word in message, message
    return message


def is_record(name: str) -> bool:
    return "/data/" in name


@pytest.mark.parametrize("which", ["one record", "every record", "every member"])
def test_directory_bit_is_refused(which, tiny_ckpt, tmp_path, capsys):
    data = tiny_ckpt.read_bytes()
    first = next(name for _, name in central_entries(data) if is_record(name))
    members = {"one record": lambda n: n == first, "every record": is_record,
               "every member": lambda n: True}[which]
    path = tmp_path / "dirbit.ckpt"
    path.write_bytes(set_external_attr(data, 0x10, members))
    assert_refused(path, tmp_path, "directory")
    for command in (["inspect", str(path)], ["convert", str(path), str(tmp_path / "o")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "directory" in err


def test_unix_directory_mode_is_refused(tiny_ckpt, tmp_path):
    data = tiny_ckpt.read_bytes()
    path = tmp_path / "unixdir.ckpt"
    path.write_bytes(set_external_attr(data, (stat.S_IFDIR | 0o755) << 16, is_record))
    assert_refused(path, tmp_path, "directory")


def test_torch_reader_misreads_the_directory_bit(tmp_path):
    """Control (the attack is real): torch.load builds the flagged tensor from memory it never
    filled. If a future torch reads it right, this control may go; the refusal stays."""
    path = tmp_path / "w.ckpt"
    want = torch.arange(4096, dtype=torch.float32)
    torch.save({"w": want}, path)
    path.write_bytes(set_external_attr(path.read_bytes(), 0x10, is_record))
    got = torch.load(path, weights_only=True)["w"]
    assert not torch.equal(got, want)


def test_tensors_are_built_from_the_checked_bytes(tmp_path, monkeypatch):
    """With the directory-bit refusal switched off, the tensor is still right: its bytes come
    from zipfile's CRC-checked read, not from torch's reader."""
    path = tmp_path / "w.ckpt"
    want = torch.arange(4096, dtype=torch.float32)
    torch.save({"w": want, "view": want[10:20]}, path)
    path.write_bytes(set_external_attr(path.read_bytes(), 0x10, is_record))
    monkeypatch.setattr(torch_zip, "_MSDOS_DIRECTORY", 0)
    got = load_pickle(path)
    assert torch.equal(got["w"], want) and torch.equal(got["view"], want[10:20])
    # Views still share one storage, as torch.load gives them.
    assert got["view"].untyped_storage().data_ptr() == got["w"].untyped_storage().data_ptr()


def test_duplicate_member_is_refused(tiny_ckpt, tmp_path):
    path = tmp_path / "dup.ckpt"
    with zipfile.ZipFile(tiny_ckpt) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
        record = next(n for n in zin.namelist() if is_record(n))
        with pytest.warns(UserWarning, match="Duplicate name"):
            zout.writestr(record, b"\0" * zin.getinfo(record).file_size)
    assert_refused(path, tmp_path, "twice")


def test_local_header_that_disagrees_is_refused(tiny_ckpt, tmp_path):
    data = tiny_ckpt.read_bytes()
    record = next(name for _, name in central_entries(data) if is_record(name))
    at = local_header(data, record)
    # torch.save writes sizes in a data descriptor after the data: damage its CRC copy.
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = z.getinfo(record)
    name_len, extra_len = struct.unpack_from("<HH", data, at + 26)
    descriptor = at + 30 + name_len + extra_len + info.compress_size
    assert data[descriptor:descriptor + 4] == b"PK\x07\x08"
    damaged = bytearray(data)
    damaged[descriptor + 4] ^= 0xFF
    path = tmp_path / "descriptor.ckpt"
    path.write_bytes(bytes(damaged))
    assert_refused(path, tmp_path, "data descriptor")
    # A local name that is not the central one (same length, so offsets stay right).
    damaged = bytearray(data)
    damaged[at + 30 + name_len - 1] ^= 0x01
    path.write_bytes(bytes(damaged))
    assert_refused(path, tmp_path, "local name")


def test_local_sizes_that_disagree_are_refused(tmp_path):
    """An archive written by Python's zipfile has its sizes in the local header."""
    src = tmp_path / "w.ckpt"
    torch.save({"w": torch.ones(16)}, src)
    path = tmp_path / "plain.ckpt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    assert torch.equal(load_pickle(path)["w"], torch.ones(16))       # the rewrite itself is fine
    data = bytearray(path.read_bytes())
    record = next(name for _, name in central_entries(bytes(data)) if is_record(name))
    at = local_header(bytes(data), record)
    struct.pack_into("<I", data, at + 22, 8)            # uncompressed size 64 -> 8
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC or sizes"):
        load_pickle(path)


def test_data_before_the_first_member_is_refused(tiny_ckpt, tmp_path):
    """zipfile finds the members of an archive with bytes prepended; torch's reader does not."""
    path = tmp_path / "prefixed.ckpt"
    path.write_bytes(b"\0" * 64 + tiny_ckpt.read_bytes())
    assert_refused(path, tmp_path, "before its first member")


def test_record_longer_than_its_tensor_is_refused(tmp_path):
    src = tmp_path / "w.ckpt"
    torch.save({"w": torch.ones(4)}, src)
    path = tmp_path / "long.ckpt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            extra = b"\0" * 8 if is_record(info.filename) else b""
            zout.writestr(info.filename, zin.read(info) + extra)
    with pytest.raises(CheckpointError, match="holds 24 bytes, its tensor needs 16"):
        load_pickle(path)


@pytest.mark.parametrize("kind", ["meta", "sparse_coo", "sparse_csr"])
def test_tensors_that_are_not_weights_are_refused(kind, tiny_weights, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)     # "sparse CSR support is in beta"
        bad = {"meta": lambda: torch.empty(4, 4, device="meta"),
               "sparse_coo": lambda: torch.eye(4).to_sparse(),
               "sparse_csr": lambda: torch.eye(4).to_sparse_csr()}[kind]()
        path = tmp_path / f"{kind}.ckpt"
        torch.save({"state_dict": {**tiny_weights, UNET_KEY: bad}}, path)
    message = assert_refused(path, tmp_path, UNET_KEY)
    assert ("meta tensor" if kind == "meta" else "sparse tensor") in message
    assert main(["convert", str(path), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_nonfinite_weights_are_reported(suffix, tiny_weights, tmp_path, capsys):
    weights = dict(tiny_weights)
    weights[UNET_KEY] = weights[UNET_KEY].clone()
    weights[UNET_KEY].view(-1)[3] = float("nan")
    vae_key = next(k for k in weights if k.startswith("first_stage_model.") and "weight" in k)
    weights[vae_key] = weights[vae_key].clone()
    weights[vae_key].view(-1)[0] = float("-inf")
    path = tmp_path / f"nan{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": weights}, path)
    else:
        safetensors.torch.save_file(weights, str(path))
    report = convert(path, tmp_path / "out")
    (note,) = [n for n in report.notes if "NaN" in n]
    assert UNET_KEY in note and vae_key in note and note.startswith("2 of ")
    assert main(["convert", str(path), str(tmp_path / "out2")]) == 0
    err = capsys.readouterr().err
    assert f"note: 2 of {len(weights)} tensors hold NaN or infinite values" in err
    if suffix == ".ckpt":                  # inspect reads a ckpt whole (a safetensors' header only)
        notes = inspect_path(path)["notes"]
        assert any(UNET_KEY in n and "NaN" in n for n in notes)
        assert main(["inspect", str(path)]) == 0
        assert "NaN or infinite" in capsys.readouterr().out


def test_a_clean_checkpoint_has_no_such_note(tiny_ckpt, tmp_path):
    report = convert(tiny_ckpt, tmp_path / "out")
    assert not [n for n in report.notes if "NaN" in n]
    assert not [n for n in inspect_path(tiny_ckpt)["notes"] if "NaN" in n]
