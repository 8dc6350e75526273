"""Hand-crafted safetensors headers: every malformed one is refused with one line, never a crash.

A seeded mutation loop over two headers (a small hand-written one and the tiny model's real one)
puts wrong JSON types in every field (dtype, shape, data_offsets, __metadata__ and its values,
whole entries, the top level), numbers beyond u64 (including a 5,001-digit one, past Python's
int-parsing limit), NaN/Infinity, booleans, floats, negatives, repeated keys, and offsets that
overlap, leave gaps or run past the end. The property: `check_safetensors` either refuses with a
single-line ModelFolderError "PATH is not a valid safetensors file: ..." or accepts a file that
the safetensors library itself then loads tensor by tensor.
"""

import copy
import json
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from ldm_engine.apps.cli import main
from ldm_engine.convert import convert
from ldm_engine.errors import ModelFolderError
from ldm_engine.formats import check_safetensors, read_safetensors

LDM = Path(sys.executable).with_name("ldm")
DEADLINE_SECONDS = 60


# A hang (e.g. a product of huge dimensions computed in full) is a failure: see conftest.
pytestmark = pytest.mark.usefixtures("deadline")


class Raw:
    """JSON text placed verbatim (json.dumps cannot write NaN-free huge literals or repeats)."""

    def __init__(self, text: str):
        self.text = text


def dumps(header: object) -> bytes:
    raws: list[str] = []

    def default(o):
        if isinstance(o, Raw):
            raws.append(o.text)
            return f"\x00RAW{len(raws) - 1}\x00"
        raise TypeError(o)
    text = json.dumps(header, default=default)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00RAW{i}\x00"), raw)
    return text.encode()


def file_bytes(header: object, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else dumps(header)
    return struct.pack("<Q", len(raw)) + raw + body


BASE = {"__metadata__": {"format": "pt", "note": "x"},
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]},
        "c": {"dtype": "I64", "shape": [], "data_offsets": [24, 32]}}
BODY = bytes(range(32))

HUGE = "1" * 5001
HOSTILE = [None, True, False, 0, -1, 1.5, -0.0, 2**64, 2**64 - 1, 10**30, "F32", "", "x" * 300,
           [], [1], [1, 2, 3], [[0, 8]], {}, {"dtype": "F32"}, [True, False], [-1, 8],
           [0.0, 8.0], [0, 2**70], Raw(HUGE), Raw("-" + HUGE), Raw("1e400"), Raw("NaN"),
           Raw("-Infinity"), Raw("1E5"), Raw("[" + HUGE + ", 8]"), Raw("{\"F32\": 1}"),
           [2**63, 2**63, 2**63], [2**20] * 2000]


def mutate(header: dict, rng: random.Random) -> object:
    """One random damage to a copy of header (a dict, or bytes where raw text is needed)."""
    h = copy.deepcopy(header)
    try:
        return _damage(h, rng)
    except (TypeError, KeyError, ValueError, IndexError, AttributeError):
        return h            # a second damage that does not apply to what the first left


def _damage(h: dict, rng: random.Random) -> object:
    names = [k for k in h if k != "__metadata__"]
    name = rng.choice(names)
    op = rng.randrange(10)
    if op == 0:                                     # a field of an entry: wrong type or value
        h[name][rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(HOSTILE)
    elif op == 1:                                   # one number inside shape or offsets
        field = rng.choice(["shape", "data_offsets"])
        if h[name][field]:
            h[name][field][rng.randrange(len(h[name][field]))] = rng.choice(HOSTILE)
        else:
            h[name][field] = [rng.choice(HOSTILE)]
    elif op == 2:                                   # __metadata__ or one of its values
        if rng.random() < 0.5:
            h["__metadata__"] = rng.choice(HOSTILE)
        else:
            h["__metadata__"]["format"] = rng.choice(HOSTILE)
    elif op == 3:                                   # a whole entry
        h[name] = rng.choice(HOSTILE)
    elif op == 4:                                   # a missing field
        del h[name][rng.choice(["dtype", "shape", "data_offsets"])]
    elif op == 5:                                   # offsets moved: overlap, gap, past the end
        start, end = h[name]["data_offsets"]
        delta = rng.choice([-8, -4, -2, -1, 1, 2, 4, 8, 10**6])
        h[name]["data_offsets"] = rng.choice([[start + delta, end + delta], [start, end + delta],
                                              [end, start], [start, start]])
    elif op == 6:                                   # two entries claim the same bytes
        other = rng.choice(names)
        h[name]["data_offsets"] = list(h[other]["data_offsets"])
    elif op == 7:                                   # a repeated key (json keeps the last)
        text = dumps(h).decode()
        if rng.random() < 0.5:
            entry = json.dumps(h[name])
            return text[:-1].encode() + f', "{name}": {entry}}}'.encode()
        return text.replace('"dtype":', '"dtype": "F32", "dtype":', 1).encode()
    elif op == 8:                                   # dtype changed, size kept or not
        h[name]["dtype"] = rng.choice(["F64", "BF16", "U8", "BOOL", "C64", "F4", "f32", "I32",
                                          "U16", "F8_E4M3", "F8_E5M2"])
    else:                                           # the top level itself
        return rng.choice([[h], "header", 5, None, True, Raw(HUGE)])
    return h


def assert_refused_or_loadable(path: Path) -> str:
    """The property; returns "refused" or "accepted"."""
    try:
        header = check_safetensors(path)
    except ModelFolderError as e:
        message = str(e)
        assert "\n" not in message, message
        assert message.startswith(f"{path} is not a valid safetensors file"), message
        return "refused"
    # Accepted: the library must agree, and our own reader must read it.
    tensors = safetensors.torch.load_file(str(path))
    assert set(tensors) == set(header) - {"__metadata__"}
    ours = read_safetensors(path)
    for key, tensor in tensors.items():
        assert ours[key].dtype == tensor.dtype and ours[key].shape == tensor.shape
        if tensor.numel():
            assert torch.equal(ours[key].view(-1).view(torch.uint8),
                               tensor.reshape(-1).view(torch.uint8))
    return "accepted"


def test_fuzzed_small_headers(tmp_path):
    rng = random.Random(0)
    seen = {"refused": 0, "accepted": 0}
    for i in range(600):
        damaged = mutate(BASE, rng)
        if rng.random() < 0.3:                      # a second damage on top
            damaged = mutate(damaged, rng) if isinstance(damaged, dict) else damaged
        path = tmp_path / f"f{i}.safetensors"
        path.write_bytes(file_bytes(damaged, BODY))
        seen[assert_refused_or_loadable(path)] += 1
        path.unlink()
    assert seen["refused"] > 400 and seen["accepted"] > 10, seen   # both sides are exercised


@pytest.fixture(scope="module")
def real_file(tiny_dir, tmp_path_factory) -> tuple[dict, bytes]:
    path = tmp_path_factory.mktemp("real") / "tiny.safetensors"
    convert(tiny_dir, path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def test_fuzzed_real_headers_through_inspect(real_file, tmp_path, capsys):
    """`ldm inspect` (main() in-process) on damaged copies of a real checkpoint: exit 0 or 2,
    and a refusal is one line with no traceback."""
    header, body = real_file
    rng = random.Random(1)
    codes = {0: 0, 2: 0}
    for i in range(150):
        path = tmp_path / f"r{i}.safetensors"
        path.write_bytes(file_bytes(mutate(header, rng), body))
        assert_refused_or_loadable(path)
        code = main(["inspect", str(path)])
        err = capsys.readouterr().err
        assert code in codes, err
        codes[code] += 1
        if code == 2:
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        path.unlink()
    assert codes[2] > 100, codes


# The three files that reached a traceback in the issue, and the rest of the named cases.
F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
NAMED = {
    "dtype is an object": {"a": {**F32, "dtype": {"F32": 1}}},
    "dtype is a list": {"a": {**F32, "dtype": ["F32"]}},
    "offset of 5001 digits": {"a": {**F32, "data_offsets": [0, Raw(HUGE)]}},
    "shape of 5001 digits": {"a": {**F32, "shape": [Raw(HUGE)]}},
    "offset beyond u64": {"a": {**F32, "data_offsets": [0, 2**64]}},
    "huge dimensions": {"a": {**F32, "shape": [2**63] * 64}},
    "thousands of dimensions": {"a": {**F32, "shape": [2**40] * 5000}},
    "offset NaN": {"a": {**F32, "data_offsets": [0, Raw("NaN")]}},
    "offset Infinity": {"a": {**F32, "data_offsets": [0, Raw("Infinity")]}},
    "offset float": {"a": {**F32, "data_offsets": [0, 8.0]}},
    "offset bool": {"a": {**F32, "data_offsets": [False, 8]}},
    "shape bool": {"a": {**F32, "shape": [True, 2]}},
    "offsets of three": {"a": {**F32, "data_offsets": [0, 4, 8]}},
    "offsets null": {"a": {**F32, "data_offsets": None}},
    "shape null": {"a": {**F32, "shape": None}},
    "dtype null": {"a": {**F32, "dtype": None}},
    "metadata null": {"__metadata__": None, "a": F32},
    "metadata list": {"__metadata__": ["a"], "a": F32},
    "metadata value object": {"__metadata__": {"k": {"v": 1}}, "a": F32},
    "metadata value null": {"__metadata__": {"k": None}, "a": F32},
    "entry is a list": {"a": [F32]},
    "entry is null": {"a": None},
    "duplicate tensor": b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                        b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
    "duplicate field": b'{"a": {"dtype": "F16", "dtype": "F32", "shape": [2], '
                       b'"data_offsets": [0, 8]}}',
    "duplicate metadata": b'{"__metadata__": {"k": "1", "k": "2"}, '
                          b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
}


@pytest.mark.parametrize("case", list(NAMED))
def test_named_malformed_headers(case, tmp_path, capsys):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(file_bytes(NAMED[case], bytes(8)))
    with pytest.raises(ModelFolderError) as info:
        check_safetensors(path)
    message = str(info.value)
    assert message.startswith(f"{path} is not a valid safetensors file: ") and "\n" not in message
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a valid safetensors file" in err


def test_ldm_inspect_executable_on_a_crafted_header(tmp_path):
    """The issue's first traceback, through the installed command: one line, exit 2."""
    path = tmp_path / "dtype-object.safetensors"
    path.write_bytes(file_bytes(NAMED["dtype is an object"], bytes(8)))
    done = subprocess.run([str(LDM), "inspect", str(path)], capture_output=True, text=True,
                          timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "is not a valid safetensors file" in done.stderr
