"""k-diffusion (PyPI `k-diffusion`, test-only) as a reference, imported without its package init.

`k_diffusion/__init__.py` imports its training stack (torchvision, kornia, wandb, clip, ...), which
this environment does not have on purpose; `sampling.py` and `external.py` need only torch,
scipy, torchsde, torchdiffeq and `utils.py`, whose one torchvision import is a module-level
`from torchvision.transforms import functional`. So: an empty stand-in torchvision in
sys.modules (only while importing), and a bare `k_diffusion` package object whose __path__ is
the installed one, so its submodules load without the package's __init__.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def load():
    """(k_diffusion.sampling, k_diffusion.external), or raise ImportError."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"], sys.modules["k_diffusion.external"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (pip install k-diffusion --no-deps)")
    stand_ins = {}
    if importlib.util.find_spec("torchvision") is None:
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        tv.transforms.functional = types.ModuleType("torchvision.transforms.functional")
        stand_ins = {"torchvision": tv, "torchvision.transforms": tv.transforms,
                     "torchvision.transforms.functional": tv.transforms.functional}
    sys.modules.update(stand_ins)
    try:
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules.setdefault("k_diffusion", pkg)
        sampling = importlib.import_module("k_diffusion.sampling")
        external = importlib.import_module("k_diffusion.external")
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)
    return sampling, external
