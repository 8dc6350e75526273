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
full unpickling, and it warns loudly. There is no automatic fallback.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch._utils import IMPORT_MAPPING, NAME_MAPPING
from torch._weights_only_unpickler import _get_allowed_globals

from .errors import CheckpointError, UnsafeCheckpointError

_LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
_ZIP_LOCAL_HEADER = b"PK\x03\x04"
# What zipfile raises for damaged archives (truncation, bad offsets, bad CRCs). Flag bits and
# compression methods it cannot read are refused by name before any member is opened.
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError)
# General-purpose flag bits torch.save never sets: encrypted (0), compressed patch data (5),
# strong encryption (6).
_UNSUPPORTED_FLAGS = 0x61
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


def _check_archive(path: Path, *, trust_pickle: bool) -> zipfile.ZipFile | None:
    """Framing checks before torch sees the file; returns the open archive (None: legacy format)."""
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
    except _ZIP_ERRORS as e:
        if head.startswith(_ZIP_LOCAL_HEADER):
            raise CheckpointError(
                f"{path} is truncated or damaged: its zip directory cannot be read ({e})") from None
        if trust_pickle and head[:1] == b"\x80":
            return None  # pre-1.6 torch.save format; only the full unpickler reads it
        raise CheckpointError(
            f"{path} is not a PyTorch zip checkpoint (.ckpt/.pt written by torch.save >= 1.6)"
            + (": it starts like a legacy pickle, which only --trust-pickle reads"
               if head[:1] == b"\x80" else "")) from None
    try:
        pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(
                f"{path} is a zip archive but not a PyTorch checkpoint (no data.pkl)")
        # torch.save stores records uncompressed; a compressed member could also be a zip bomb.
        packed = [i.filename for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED]
        if packed:
            raise CheckpointError(f"{path} is not a PyTorch checkpoint: {packed[0]} is compressed")
        flagged = [i.filename for i in archive.infolist() if i.flag_bits & _UNSUPPORTED_FLAGS]
        if flagged:
            raise CheckpointError(f"{path} is damaged or not a PyTorch checkpoint: {flagged[0]} "
                                  "is marked encrypted or patched")
        # torch does not check the archive's CRCs; a flipped bit in a tensor would load silently.
        for info in archive.infolist():
            with archive.open(info) as member:
                while member.read(1 << 24):
                    pass
    except _ZIP_ERRORS as e:
        archive.close()
        raise CheckpointError(f"{path} is damaged: {e}") from None
    except CheckpointError:
        archive.close()
        raise
    return archive


def load_pickle(path: str | Path, *, trust_pickle: bool = False) -> object:
    """The object a ``.ckpt`` holds, tensors on CPU; refused unless it passes the allowlist.

    The archive's CRCs are checked and every tensor record is read into memory, where torch
    checks its size. (Memory-mapping would be lighter, but torch's mmap path does not notice a
    record shorter than its tensor: the tensor silently reads the bytes that follow.)
    """
    path = Path(path)
    archive = _check_archive(path, trust_pickle=trust_pickle)
    if trust_pickle:
        if archive is not None:
            archive.close()
        warnings.warn(
            f"--trust-pickle: fully unpickling {path}. This runs any code the file contains; "
            "do it only for files from a source you trust.", UnsafeLoadWarning, stacklevel=2)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # any failure of an arbitrary pickle is the file's fault
            raise CheckpointError(f"cannot load {path}: {type(e).__name__}: {e}") from None
    try:
        pkl_name = next(n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
        data = archive.read(pkl_name)
    except _ZIP_ERRORS as e:
        raise CheckpointError(f"{path} is damaged: {e}") from None
    finally:
        archive.close()
    unsafe = [python_name(*g) for g in pickle_globals(data) if not _allowed(torch_name(*g))]
    if unsafe:
        raise _refusal(path, f"references {', '.join(unsafe[:5])}, which is not")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        message = str(e)
        if "GLOBAL" in message or "reduce" in message or "Can only" in message:
            # The scan passed but the unpickler did not: quote the unpickler's own reason.
            reason = next((line.strip() for line in message.splitlines()
                           if "GLOBAL" in line or "reduce" in line or "Can only" in line), message)
            raise _refusal(path, f"asks for something ({reason}) that is not") from None
        last = message.strip().splitlines()[-1] if message.strip() else "unreadable"
        raise CheckpointError(f"{path} holds a damaged pickle: {last}") from None
    except Exception as e:  # torch reports damage as RuntimeError, EOFError, ... depending on where
        raise CheckpointError(f"{path} is damaged or not a checkpoint: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None


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
    return tensors, extras


def save_ckpt(tensors: Mapping[str, torch.Tensor], path: str | Path,
              metadata: Mapping[str, str]) -> None:
    """Write the LDM layout: {"state_dict": ...}, plus our metadata as plain strings.

    Everything in it loads with weights_only=True, so our own files never need --trust-pickle.
    """
    torch.save({"state_dict": dict(tensors), "ldm_engine": dict(metadata)}, path)
