"""Reading and writing ``.ckpt``/``.pt`` files (PyTorch zip archives holding a pickle) safely.

A pickle is a program: loading one can import and call anything, so a downloaded ``.ckpt`` is
loaded only through torch's ``weights_only`` unpickler, which builds tensors and plain containers
and refuses every other global unless it is allowlisted. The allowlist below is what released SD
checkpoints actually contain besides tensors, and nothing that can run code:

* ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` -- SD-1.x files were written
  by PyTorch Lightning, whose ``callbacks`` entry is keyed by this *class*. Lightning is not
  installed here, so the name is bound to an inert stand-in class with no methods: unpickling can
  at most create an empty instance of it.
* ``numpy.core.multiarray.scalar``, ``numpy.dtype`` and numpy's numeric ``numpy.dtypes.*DType``
  classes -- the callback state keeps scores like ``best_model_score`` as numpy scalars, pickled
  as ``scalar(dtype('f8'), raw_bytes)``. numpy 2 spells the module ``numpy._core``; both names map
  to the same function. (``_codecs.encode``, which carries those raw bytes, torch allows by
  default.)

Anything else is refused with the offending global named; ``--trust-pickle`` is the only way to
full unpickling of a zip checkpoint, and it warns loudly. There is no automatic fallback. A
legacy (pre-1.6, non-zip) ``torch.save`` file is read by torch's own legacy loader, always with
``weights_only=True`` and the same allowlist: such a file that holds more than weights is refused
whatever the flags (re-save it with torch >= 1.6 where you trust it).

The pickle is run by our own call of that unpickler (not ``torch.load``) so that its
``persistent_load`` -- where torch would read each tensor's bytes with its own zip reader -- is
served from CRC-checked ``zipfile`` reads instead (torch_zip.py says why).
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import pickletools
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch._utils import IMPORT_MAPPING, NAME_MAPPING
from torch._weights_only_unpickler import Unpickler as WeightsOnlyUnpickler
from torch._weights_only_unpickler import _get_allowed_globals
from torch.serialization import StorageType, _maybe_decode_ascii

from .errors import CheckpointError, UnsafeCheckpointError
from .torch_zip import CheckpointArchive, open_checkpoint

LIGHTNING_CHECKPOINT_CALLBACK = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"


class UnsafeLoadWarning(UserWarning):
    """A checkpoint is being fully unpickled because the user asked for it (--trust-pickle)."""


class LightningCallbackStandIn:
    """Takes the place of Lightning's ModelCheckpoint class when a checkpoint names it."""


def _numpy_allowlist() -> list[tuple[object, str]]:
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    entries = [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
               (np.dtype, "numpy.dtype")]
    # Unpickling a dtype ends with BUILD on the instance, which torch allows only for allowlisted
    # types: the concrete DType classes (numpy >= 1.25) of the numeric dtypes, not object/void.
    for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
              np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128):
        cls = type(np.dtype(t))
        entries.append((cls, f"numpy.dtypes.{cls.__name__}"))
    return entries


SAFE_GLOBALS: list[tuple[object, str]] = [
    (LightningCallbackStandIn, LIGHTNING_CHECKPOINT_CALLBACK), *_numpy_allowlist()]
ALLOWED_NAMES = frozenset(name for _, name in SAFE_GLOBALS)


_STRING_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
                         "SHORT_BINUNICODE", "BINUNICODE8"})


def _renamed(module: str, name: str, name_map: dict, import_map: dict) -> str:
    if (module, name) in name_map:
        module, name = name_map[(module, name)]
    elif module in import_map:
        module = import_map[module]
    return f"{module}.{name}"


def torch_name(module: str, name: str) -> str:
    """The name torch's weights_only unpickler checks (it renames a few Python 2 modules)."""
    return _renamed(module, name, NAME_MAPPING, IMPORT_MAPPING)


def python_name(module: str, name: str) -> str:
    """What a full unpickle would import: protocol-2 pickles spell some Python 3 globals the
    Python 2 way (subprocess.Popen is written as ``commands Popen``)."""
    return _renamed(module, name, _compat_pickle.NAME_MAPPING, _compat_pickle.IMPORT_MAPPING)


def pickle_globals(data: bytes) -> list[tuple[str, str]]:
    """The (module, name) globals a pickle imports, found by parsing it (nothing is executed).

    Protocol <= 3 names a global inline (GLOBAL "os system"); protocol 4 pushes two strings and
    then STACK_GLOBAL, possibly fetching them from the memo, so recent strings are tracked. This
    lets a refusal name what the file wanted and happen before torch is involved; the guard that
    enforces the allowlist is still torch's weights_only unpickler, whatever this scan misses.
    """
    found: list[str] = []
    strings: list[str] = []
    memo: dict[int, object] = {}
    last: object = None
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                module, _, name = str(arg).partition(" ")
                found.append((module, name))
                last = None
            elif op.name in _STRING_OPS:
                last = arg if isinstance(arg, str) else bytes(arg).decode("latin-1")
                strings.append(last)
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append((strings[-2], strings[-1]))
                last = None
            elif op.name == "MEMOIZE":
                memo[len(memo)] = last
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = last
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                last = memo.get(int(arg))
                if isinstance(last, str):
                    strings.append(last)
            else:
                last = None
    except (ValueError, KeyError, IndexError):
        pass  # a damaged pickle: report what was found before the damage
    return list(dict.fromkeys(found))


# torch.tensor became torch._tensor (pytorch#51633); old pickles name the old module.
_TORCH_MODULE_RENAMES = {"torch.tensor": "torch._tensor"}


class _FullUnpickler(pickle.Unpickler):
    """The full unpickler of --trust-pickle: any global (as torch's unrestricted loading), with
    storage type names mapped."""

    def find_class(self, module: str, name: str):
        if type(name) is str and "Storage" in name:
            try:
                return StorageType(name)
            except KeyError:
                pass
        return super().find_class(_TORCH_MODULE_RENAMES.get(module, module), name)


def _unpickle(archive: CheckpointArchive, data: bytes, *, trust_pickle: bool) -> object:
    """Run the pickle with tensors served by `archive` (CRC-checked zipfile reads), never by
    torch's zip reader. weights_only: torch's restricted unpickler with our allowlist."""
    def persistent_load(saved_id):
        if not (isinstance(saved_id, tuple) and len(saved_id) == 5
                and _maybe_decode_ascii(saved_id[0]) == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {str(saved_id)[:60]}")
        _, storage_type, key, _location, numel = saved_id
        return archive.typed_storage(storage_type, _maybe_decode_ascii(key), numel)

    if trust_pickle:
        unpickler = _FullUnpickler(io.BytesIO(data), encoding="utf-8")
    else:
        unpickler = WeightsOnlyUnpickler(io.BytesIO(data), encoding="utf-8")
    unpickler.persistent_load = persistent_load
    try:
        if trust_pickle:
            return unpickler.load()
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return unpickler.load()
    finally:
        _clear_sparse_validation()


def _clear_sparse_validation() -> None:
    """Rebuilt sparse tensors wait in a torch-global list for a bulk check; run it (and so empty
    the list) whatever happened. Sparse tensors are refused later anyway."""
    try:
        torch._utils._validate_loaded_sparse_tensors()
    except Exception:  # an invalid sparse tensor: refused by its layout in any case
        torch._utils._sparse_tensors_to_validate.clear()


def load_pickle(path: str | Path, *, trust_pickle: bool = False) -> object:
    """The object a ``.ckpt`` holds, tensors on CPU; refused unless it passes the allowlist.

    Every tensor's bytes come from a whole, CRC-checked read of its record through zipfile (see
    torch_zip.py); nothing is memory-mapped (torch's mmap path does not notice a record shorter
    than its tensor: the tensor silently reads the bytes that follow).
    """
    path = Path(path)
    archive = open_checkpoint(path)
    if archive is None:
        return _load_legacy(path)
    if trust_pickle:
        warnings.warn(
            f"--trust-pickle: fully unpickling {path}. This runs any code the file contains; "
            "do it only for files from a source you trust.", UnsafeLoadWarning, stacklevel=2)
    try:
        data = archive.read("data.pkl")
        if not trust_pickle:
            unsafe = [python_name(*g) for g in pickle_globals(data)
                      if not _allowed(torch_name(*g))]
            if unsafe:
                raise _refusal(path, f"references {', '.join(unsafe[:5])}, which is not")
        return _unpickle(archive, data, trust_pickle=trust_pickle)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        message = str(e)
        if not trust_pickle and ("GLOBAL" in message or "reduce" in message
                                 or "Can only" in message):
            # The scan passed but the unpickler did not: quote the unpickler's own reason.
            reason = next((line.strip() for line in message.splitlines()
                           if "GLOBAL" in line or "reduce" in line or "Can only" in line), message)
            raise _refusal(path, f"asks for something ({reason}) that is not") from None
        last = message.strip().splitlines()[-1] if message.strip() else "unreadable"
        raise CheckpointError(f"{path} holds a damaged pickle: {last}") from None
    except Exception as e:  # damage surfaces as RuntimeError, EOFError, ... depending on where
        raise CheckpointError(f"{path} is damaged or not a checkpoint: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        archive.close()


def _load_legacy(path: Path) -> object:
    """A pre-1.6 (non-zip) torch.save file, through torch's legacy loader with weights_only=True
    and our allowlist: that format's tensors live inside its pickle stream, so there is no
    archive to serve them from, and it is never fully unpickled (not even with --trust-pickle)."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "unreadable"
        raise UnsafeCheckpointError(
            f"refusing to load {path}: a legacy (pre-1.6 torch.save) checkpoint whose pickle "
            f"holds more than weights ({reason[:120]}); re-save it with torch >= 1.6 where you "
            "trust it, then convert that file") from None
    except Exception as e:  # damage surfaces as RuntimeError, EOFError, ... depending on where
        raise CheckpointError(f"{path} is damaged or not a checkpoint (legacy torch.save format): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                              ) from None
    finally:
        _clear_sparse_validation()


def _allowed(name: str) -> bool:
    return name in ALLOWED_NAMES or name in _get_allowed_globals()


def _refusal(path: Path, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"refusing to load {path}: its pickle {what} on the allowlist of what SD checkpoints "
        "contain (loading it could run code). If you trust the file's source, pass --trust-pickle "
        "to unpickle it fully")


def checkpoint_state_dict(obj: object, path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(the tensors, the scalar extras such as global_step) of a loaded checkpoint object.

    LDM/Lightning checkpoints wrap the weights as {"state_dict": ..., "global_step": ...};
    others are the bare state dict.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    inner = obj.get("state_dict")
    state = inner if isinstance(inner, Mapping) else obj
    extras = {}
    if state is not obj:
        extras = {str(k): v for k, v in obj.items() if k != "state_dict"
                  and isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        meta = obj.get("ldm_engine")
        if isinstance(meta, Mapping):
            extras["ldm_engine"] = {str(k): str(v) for k, v in meta.items()}
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors: not a model checkpoint")
    for key, tensor in tensors.items():
        _check_plain_tensor(key, tensor, path)
    return tensors, extras


def _check_plain_tensor(key: str, tensor: torch.Tensor, path: str | Path) -> None:
    """Weights are dense CPU tensors with data. The weights_only unpickler can also rebuild meta
    tensors (no data: every later copy fails), sparse, quantized or nested ones (which no weights
    file holds and safetensors cannot store)."""
    what = None
    if tensor.is_meta:
        what = "a meta tensor (shape only, no data)"
    elif tensor.is_nested:
        what = "a nested tensor"
    elif tensor.layout != torch.strided:
        what = f"a sparse tensor ({str(tensor.layout).removeprefix('torch.')})"
    elif tensor.is_quantized:
        what = "a quantized tensor"
    elif tensor.device.type != "cpu":
        what = f"a tensor on {tensor.device}"
    if what is not None:
        raise CheckpointError(f"{path} is not a weights checkpoint: {key} is {what}")


def save_ckpt(tensors: Mapping[str, torch.Tensor], path: str | Path,
              metadata: Mapping[str, str]) -> None:
    """Write the LDM layout: {"state_dict": ...}, plus our metadata as plain strings.

    Everything in it loads with weights_only=True, so our own files never need --trust-pickle.
    """
    torch.save({"state_dict": dict(tensors), "ldm_engine": dict(metadata)}, path)
