"""Ahead-of-time compiled networks, one cached package per input shape.

Why AOTInductor rather than a plain ``torch.compile``: on these CPUs ``torch.compile`` only beats
eager with inductor's *freezing* (weights become constants, so convolution and linear weights are
pre-packed once into oneDNN's blocked layouts and constant subgraphs are folded). A frozen graph is
specific to the weights and the input shapes, and in-process compilation of the SD-1.5 UNet costs
about 85 s on 2 cores, 45 s again in every new process even with inductor's own caches warm.
Exporting once and packaging the frozen program as a ``.pt2`` file turns a later process's start
into a 1.5 s load.

The cache key covers everything the package depends on: the weights (a content fingerprint, so a
fine-tuned or LoRA-merged model never picks up a stale package), the input shapes and dtypes, the
memory format, the device and its instruction set, and the torch version. A new shape is never a
silent recompile: it is logged as a one-time compile, counted in ``compiles``, and saved.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import UserInputError
from .fsutil import atomic_path

log = logging.getLogger("ldm_engine.compiled")

# Inductor settings the packages are built with: freezing + weight pre-packing is what pays on
# CPU. Weights go in a separate blob rather than inside the shared library: a package with them
# in the .so held them twice once loaded (SD-1.5 UNet: +3.3 GB resident for 1.7 GB of weights,
# against +1.65 GB from a blob).
INDUCTOR_OPTIONS = {"freezing": True, "cpp.weight_prepack": True,
                    "aot_inductor.package_constants_in_so": False,
                    "aot_inductor.package_constants_on_disk_format": "binary_blob"}
PACKAGE_FORMAT = 2
CHANGED_WEIGHTS = ("the weights changed after the pipeline was built with compile=True; build a new "
                   "pipeline from the changed weights (its packages are compiled anew)")


def cache_dir() -> Path:
    """$LDM_CACHE_DIR, else $XDG_CACHE_HOME/ldm-engine, else ~/.cache/ldm-engine; then /compiled."""
    if os.environ.get("LDM_CACHE_DIR"):
        return Path(os.environ["LDM_CACHE_DIR"]) / "compiled"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ldm-engine" / "compiled"


def weights_fingerprint(module: torch.nn.Module, samples: int = 4096) -> str:
    """A hash of names, shapes, dtypes and an evenly strided sample of every tensor's values.

    Hashing all of the SD-1.5 UNet's 1.7 GB would cost seconds per start; sampling 4096 values per
    tensor changes whenever a fine-tune, a merge or a dtype cast touches the weights.
    """
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        sample = flat[::step][:samples].float().cpu().contiguous()
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda-{torch.cuda.get_device_name(index)}-sm{major}{minor}"
    return f"cpu-{torch.backends.cpu.get_cpu_capability()}"


def _describe(t: torch.Tensor) -> str:
    layout = "cl" if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
        and not t.is_contiguous() else "c"
    return f"{tuple(t.shape)}:{str(t.dtype).removeprefix('torch.')}:{layout}"


class _Program(torch.nn.Module):
    """The module plus the function that calls it, as one exportable forward."""

    def __init__(self, module: torch.nn.Module, fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.fn(self.module, *inputs)


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them for reuse otherwise: after dropping
    the SD-1.5 UNet's 1.7 GB of weights, RSS fell by only 0.8 GB without this)."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass          # not glibc: nothing to trim, or the allocator returns pages by itself


class OffloadableWeights:
    """A module's weights, dropped from memory while compiled packages stand in for them.

    A loaded package holds its own (frozen, pre-packed) copy of every weight, so keeping the eager
    ones too would double the model's memory. They are dropped before a package is loaded and
    re-read from their safetensors file only when a new input shape has to be compiled. The
    fingerprint taken at construction guards the swap: weights edited in place since then would
    be lost by it (and would make every package stale), so that is refused with an error.
    """

    def __init__(self, module: torch.nn.Module, file: Path, memory_format: torch.memory_format):
        self.module = module
        self.file = Path(file)
        self.memory_format = memory_format
        self.fingerprint = weights_fingerprint(module)
        self.resident = True

    @classmethod
    def for_file(cls, module: torch.nn.Module, file: Path,
                 memory_format: torch.memory_format) -> "OffloadableWeights | None":
        """None when the file's tensor names are not exactly the module's parameters (a layout
        the loader had to rename), since the weights could not be read back by name."""
        from .formats import check_safetensors

        names = set(check_safetensors(file)) - {"__metadata__"}
        if names != {name for name, _ in module.named_parameters()} or any(module.buffers()):
            return None
        return cls(module, file, memory_format)

    def release(self) -> None:
        if not self.resident:
            return
        if weights_fingerprint(self.module) != self.fingerprint:
            raise UserInputError(CHANGED_WEIGHTS)
        for p in self.module.parameters():
            p.data = p.data.new_empty(0)
        self.resident = False
        _return_freed_memory()

    def restore(self) -> None:
        if self.resident:
            return
        from .formats import read_safetensors

        params = dict(self.module.named_parameters())
        first = next(iter(params.values()))
        state = read_safetensors(self.file, first.dtype,
                                 channels_last=self.memory_format == torch.channels_last)
        for name, p in params.items():
            p.data = state[name].to(first.device)
        self.resident = True


class AOTCompiled:
    """``fn(module, *tensors) -> tensor``, run as a frozen AOTInductor package per input signature.

    Packages live in ``cache_dir()`` and are written atomically; one that fails to load (a torch
    upgrade, a truncated file) is compiled afresh and replaced.
    """

    def __init__(self, module: torch.nn.Module, fn: Callable[..., torch.Tensor], *, name: str,
                 directory: Path | None = None, offload: OffloadableWeights | None = None):
        self.module = module
        self.fn = fn
        self.name = name
        self.directory = directory or cache_dir()
        self.offload = offload
        self.fingerprint = offload.fingerprint if offload else weights_fingerprint(module)
        self.compiles = 0            # packages built by this object (not loaded from the cache)
        self._loaded: dict[str, Callable] = {}

    def key(self, inputs: tuple[torch.Tensor, ...]) -> str:
        device = inputs[0].device
        parts = {"format": PACKAGE_FORMAT, "name": self.name, "weights": self.fingerprint,
                 "inputs": [_describe(t) for t in inputs], "device": device_tag(device),
                 "torch": torch.__version__, "options": INDUCTOR_OPTIONS}
        digest = hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=12)
        return f"{self.name}-{digest.hexdigest()}"

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = self.key(inputs)
        run = self._loaded.get(key)
        if run is None:
            run = self._loaded[key] = self._load_or_compile(key, inputs)
        return run(*inputs)

    def _load_or_compile(self, key: str, inputs: tuple[torch.Tensor, ...]) -> Callable:
        path = self.directory / f"{key}.pt2"
        if path.is_file():
            try:
                if self.offload:
                    self.offload.release()
                return torch._inductor.aoti_load_package(str(path))
            except UserInputError:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable package is rebuilt
                log.warning("cached compiled %s at %s does not load (%s); recompiling",
                            self.name, path, e)
        shapes = ", ".join(_describe(t) for t in inputs)
        log.warning("compiling %s for inputs %s (one-time; cached at %s)", self.name, shapes, path)
        start = time.perf_counter()
        if self.offload:
            self.offload.restore()
        if weights_fingerprint(self.module) != self.fingerprint:
            # Compiling now would file today's weights under the key of those at construction.
            raise UserInputError(CHANGED_WEIGHTS)
        with torch.no_grad():
            program = torch.export.export(_Program(self.module, self.fn), inputs, strict=False)
            with atomic_path(path) as tmp:
                # The packager insists on a .pt2 suffix.
                staged = tmp.with_name(tmp.name + ".pt2")
                try:
                    torch._inductor.aoti_compile_and_package(
                        program, package_path=str(staged),
                        # A copy: the packager adds its own entries to the dict it is given.
                        inductor_configs=dict(INDUCTOR_OPTIONS))
                    os.replace(staged, tmp)
                finally:
                    staged.unlink(missing_ok=True)
        self.compiles += 1
        log.warning("compiled %s in %.1f s", self.name, time.perf_counter() - start)
        if self.offload:
            self.offload.release()
        return torch._inductor.aoti_load_package(str(path))
