"""A .ckpt is a pickle, and a pickle is a program: loading must never run what it says.

Each malicious file would create a canary file if unpickled normally. They are refused, by
`convert`, by `inspect` and on the command line, with the offending global and --trust-pickle
named, and the canary never appears. Checkpoints shaped like real SD releases (a PyTorch
Lightning callback keyed by its class, numpy scalars) load without --trust-pickle.
"""

import builtins
import importlib
import os
import pickle
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from ldm_engine.apps.cli import main
from ldm_engine.convert import convert
from ldm_engine.convert import ckpt
from ldm_engine.convert.ckpt import load_pickle
from ldm_engine.convert.errors import UnsafeCheckpointError
from ldm_engine.inspection import inspect_path


def replace_pickle(template: Path, dest: Path, data: bytes) -> Path:
    """A torch zip archive whose data.pkl is `data` (the tensor records are kept)."""
    with zipfile.ZipFile(template) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, data if info.filename.endswith("/data.pkl") else zin.read(info))
    return dest


class Reduce:
    """An object whose unpickling calls func(*args)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(canary: Path) -> dict[str, object]:
    touch = f"open({str(canary)!r}, 'w').close()"
    return {
        "os.system": Reduce(os.system, f"touch {canary}"),
        "builtins.exec": Reduce(builtins.exec, touch),
        "builtins.eval": Reduce(builtins.eval, f"__import__('os').system('touch {canary}')"),
        "subprocess.Popen": Reduce(subprocess.Popen, ["touch", str(canary)]),
        "subprocess.check_output": Reduce(subprocess.check_output, ["touch", str(canary)]),
    }


def getattr_chain(canary: Path) -> bytes:
    """builtins.getattr(importlib.import_module('os'), 'system')('touch CANARY'), hand-assembled
    in protocol-2 opcodes (pickle cannot produce it from objects: modules do not pickle)."""
    def unicode(s: str) -> bytes:
        b = s.encode()
        return b"X" + len(b).to_bytes(4, "little") + b
    return (b"\x80\x02cbuiltins\ngetattr\n(cimportlib\nimport_module\n(" + unicode("os") + b"tR"
            + unicode("system") + b"tR(" + unicode(f"touch {canary}") + b"tR.")


def malicious_files(tmp_path: Path) -> dict[str, Path]:
    canary = tmp_path / "canary"
    files = {}
    for name, obj in payloads(canary).items():
        # Hidden where a loader would look: inside the state dict, next to real tensors.
        path = tmp_path / f"{name}.ckpt"
        torch.save({"state_dict": {"w": torch.ones(2), "x": obj}}, path)
        files[name] = path
    template = tmp_path / "template.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, template)
    files["getattr chain"] = replace_pickle(template, tmp_path / "chain.ckpt", getattr_chain(canary))
    # Protocol 4 names globals with STACK_GLOBAL (and memoised strings), not GLOBAL.
    files["protocol 4"] = replace_pickle(template, tmp_path / "p4.ckpt",
                                         pickle.dumps(Reduce(os.system, f"touch {canary}"), protocol=4))
    # Protocol 0's INST opcode builds and calls in one step.
    files["INST"] = replace_pickle(template, tmp_path / "inst.ckpt",
                                   f"(S'touch {canary}'\nios\nsystem\n.".encode())
    return files


EXPECTED_NAMES = {"os.system": "system", "builtins.exec": "builtins.exec",
                  "builtins.eval": "builtins.eval", "subprocess.Popen": "subprocess.Popen",
                  "subprocess.check_output": "subprocess.check_output",
                  "getattr chain": "builtins.getattr", "protocol 4": "system", "INST": "os.system"}


@pytest.fixture
def no_weights_only_false(monkeypatch):
    """Fail the test if anything unpickles fully: torch.load without weights_only=True, or the
    converter's own full unpickler (what --trust-pickle uses)."""
    real = torch.load

    def guarded(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "torch.load called without weights_only=True"
        return real(*args, **kwargs)

    class Refused:
        def __init__(self, *args, **kwargs):
            raise AssertionError("full unpickler used without --trust-pickle")

    monkeypatch.setattr(torch, "load", guarded)
    monkeypatch.setattr(ckpt, "_FullUnpickler", Refused)


@pytest.mark.parametrize("style", list(EXPECTED_NAMES))
def test_malicious_pickles_are_refused(style, tmp_path, capsys, no_weights_only_false):
    path = malicious_files(tmp_path)[style]
    canary = tmp_path / "canary"
    with pytest.raises(UnsafeCheckpointError) as info:
        convert(path, tmp_path / "out")
    message = str(info.value)
    assert EXPECTED_NAMES[style] in message and "--trust-pickle" in message
    with pytest.raises(UnsafeCheckpointError):
        inspect_path(path)
    assert main(["convert", str(path), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "--trust-pickle" in err and len(err.strip().splitlines()) == 1
    assert main(["inspect", str(path)]) == 2
    assert not canary.exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_the_payloads_are_live(tmp_path):
    """Control: unpickled fully (what --trust-pickle does) a payload does run."""
    canary = tmp_path / "canary"
    path = tmp_path / "exec.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": payloads(canary)["builtins.exec"]}, path)
    with pytest.warns(UserWarning, match="runs any code"):
        obj = load_pickle(path, trust_pickle=True)
    assert canary.exists() and torch.equal(obj["state_dict"]["w"], torch.ones(2))


def lightning_checkpoint(path: Path, state_dict: dict) -> Path:
    """Save what an SD-1.x release holds besides weights, as Lightning wrote it: the
    ModelCheckpoint callback's state keyed by the class itself, with numpy scalars inside."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    # Lightning exists only while saving; it is gone again when the file is loaded.
    with pytest.MonkeyPatch.context() as mp:
        for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
            mp.setitem(sys.modules, name, types.ModuleType(name))
        mp.setitem(sys.modules, module.__name__, module)
        torch.save({
            "state_dict": state_dict, "epoch": 6, "global_step": 470000,
            "pytorch-lightning_version": "1.4.2",
            "callbacks": {ModelCheckpoint: {
                "monitor": None, "best_model_score": np.float64(0.25), "best_model_path": "last.ckpt",
                "current_score": np.float32(1.5), "kth_value": np.dtype("float64"),
                "best_k_models": {}}},
        }, path)
    return path


def test_lightning_and_numpy_state_loads_without_trust(tmp_path, no_weights_only_false):
    path = lightning_checkpoint(tmp_path / "sd.ckpt", {"w": torch.arange(4.0)})
    assert "pytorch_lightning" not in sys.modules
    obj = load_pickle(path)
    (state,) = obj["callbacks"].values()
    assert state["best_model_score"] == 0.25 and state["current_score"] == np.float32(1.5)
    assert torch.equal(obj["state_dict"]["w"], torch.arange(4.0))
    # Files pickled under numpy 1.x spell the scalar constructor numpy.core.multiarray.scalar.
    data = zipfile.ZipFile(path).read("sd/data.pkl")
    old = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
    assert old != data
    obj = load_pickle(replace_pickle(path, tmp_path / "numpy1.ckpt", old))
    assert next(iter(obj["callbacks"].values()))["best_model_score"] == 0.25


def test_a_lightning_sd_checkpoint_converts(tiny_dir, tmp_path, no_weights_only_false):
    convert(tiny_dir, tmp_path / "tiny.safetensors")
    weights = safetensors.torch.load_file(str(tmp_path / "tiny.safetensors"))
    path = lightning_checkpoint(tmp_path / "tiny.ckpt", weights)
    report = convert(path, tmp_path / "folder")
    assert report.family == "tiny"
    assert main(["inspect", str(path)]) == 0


def test_allowlisted_names_cannot_smuggle_calls(tmp_path):
    """The stand-in for Lightning's class is inert: 'calling' it builds an empty object, and
    numpy's allowlisted constructors cannot reach code either."""
    template = tmp_path / "t.ckpt"
    torch.save({"w": torch.ones(1)}, template)
    call = (b"\x80\x02cpytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint\n)R}"
            b"X\x03\x00\x00\x00cmdX\x04\x00\x00\x00evilsb.")
    obj = load_pickle(replace_pickle(template, tmp_path / "call.ckpt", call))
    assert type(obj).__name__ == "LightningCallbackStandIn" and obj.cmd == "evil"
    assert not any(callable(getattr(obj, n)) for n in vars(obj))


def test_module_names_are_never_imported(tmp_path):
    """Refusal happens before anything the pickle names is imported."""
    name = "ldm_engine_canary_module"
    template = tmp_path / "t.ckpt"
    torch.save({"w": torch.ones(1)}, template)
    path = replace_pickle(template, tmp_path / "imp.ckpt", b"\x80\x02c" + name.encode() + b"\nrun\n)R.")
    sys.path.insert(0, str(tmp_path))
    (tmp_path / f"{name}.py").write_text(f"open({str(tmp_path / 'canary')!r}, 'w').close()\n"
                                         "def run(): pass\n")
    try:
        with pytest.raises(UnsafeCheckpointError, match=name):
            load_pickle(path)
    finally:
        sys.path.remove(str(tmp_path))
    assert name not in sys.modules and not (tmp_path / "canary").exists()
    importlib.invalidate_caches()


def test_trust_pickle_is_the_only_way_past_the_allowlist(tiny_dir, tmp_path, capsys):
    """A harmless but non-allowlisted global (fractions.Fraction) is refused; --trust-pickle
    loads it, saying loudly what it is doing."""
    import fractions

    convert(tiny_dir, tmp_path / "tiny.safetensors")
    weights = safetensors.torch.load_file(str(tmp_path / "tiny.safetensors"))
    path = tmp_path / "fraction.ckpt"
    torch.save({"state_dict": weights, "lr": fractions.Fraction(1, 3)}, path)
    assert main(["convert", str(path), str(tmp_path / "out")]) == 2
    assert "fractions.Fraction" in capsys.readouterr().err
    assert main(["convert", str(path), str(tmp_path / "out"), "--trust-pickle"]) == 0
    err = capsys.readouterr().err
    assert "ldm convert: warning: --trust-pickle: fully unpickling" in err
    assert (tmp_path / "out/model_index.json").is_file()


def test_legacy_format_weights_load_with_the_safe_loader(tmp_path, no_weights_only_false):
    """A pre-1.6 (non-zip) torch.save file of weights loads with weights_only=True, without
    --trust-pickle; the guard fails the test if anything unpickles fully."""
    path = tmp_path / "old.ckpt"
    weights = {"state_dict": {"w": torch.arange(4.0)}, "global_step": 7}
    torch.save(weights, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    obj = load_pickle(path)
    assert torch.equal(obj["state_dict"]["w"], weights["state_dict"]["w"])
    assert obj["global_step"] == 7


@pytest.mark.parametrize("trust", [False, True])
def test_legacy_format_with_code_is_refused_even_with_trust_pickle(tmp_path, trust):
    """The legacy format is never fully unpickled: its payload does not run, whatever the flag,
    and the one-line error says how to get a file that loads."""
    canary = tmp_path / "canary"
    path = tmp_path / "old-exec.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": payloads(canary)["builtins.exec"]},
               path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match="legacy .*re-save it with torch >= 1.6"):
        load_pickle(path, trust_pickle=trust)
    assert not canary.exists()
