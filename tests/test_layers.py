"""The engine's layers import downwards only, and its one import-time side effect is in one place.

    3  ldm_engine.apps            CLI, server, web UI, bench
    2  pipelines, train           (train may use pipelines to sample; pipelines never use train)
    0  schedulers, ldm_engine (the rest): samplers, models, formats, conversion, tokenizer

Every import statement is read from the source (function-local ones too: a lazy import that runs
upward is still an upward dependency), so these tests need no torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ldm_engine", "pipelines", "schedulers", "train")


def layer(module: str) -> int | None:
    """The layer of a dotted module name of the engine; None for anything else (torch, ...)."""
    top = module.split(".")[0]
    if module == "ldm_engine.apps" or module.startswith("ldm_engine.apps."):
        return 3
    return {"pipelines": 2, "train": 2, "schedulers": 0, "ldm_engine": 0}.get(top)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a file (module `name`, by default the one
    its path names), relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    here = (name or module_name(path)).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            if node.module is None:          # `from . import x`: x is a module of the package
                out += [(node.lineno, f"{name}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, name))
    return out


def engine_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_the_scan_sees_relative_and_function_local_imports(tmp_path):
    # A test that could not fail would be a defect: prove the scanner finds both kinds.
    src = tmp_path / "probe.py"
    src.write_text("def f():\n    from ...pipelines import base\n    import train.data\n"
                   "from . import folder\n")
    found = {m for _, m in imports_of(src, "ldm_engine.convert.probe")}
    assert found == {"pipelines", "train.data", "ldm_engine.convert.folder"}
    assert layer("pipelines") > layer("ldm_engine.convert.probe")


def test_imports_go_only_downwards():
    upward = []
    for path in engine_files():
        me = module_name(path)
        mine = layer(me)
        for line, target in imports_of(path):
            theirs = layer(target)
            if theirs is None:
                continue
            wrong = theirs > mine or (me.split(".")[0] == "pipelines"
                                      and target.split(".")[0] == "train")
            if wrong:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_no_package_imports_the_core_for_its_side_effect_alone():
    # The allocator option is set by ldm_engine/__init__.py; a bare `import ldm_engine` elsewhere
    # would exist only to trigger it, which is what this layout avoids.
    bare = [f"{p.relative_to(ROOT)}:{line}" for p in engine_files()
            for line, target in imports_of(p)
            if target == "ldm_engine" and p.parent != ROOT / "ldm_engine"
            and f"import ldm_engine\n" in p.read_text()]
    assert not bare, bare


def test_the_environment_is_set_in_one_place_only():
    setters = []
    for path in engine_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:                      # module level: runs at import time
            text = ast.unparse(node)
            if "os.environ" in text and ("setdefault" in text or "os.environ[" in text
                                         and isinstance(node, ast.Assign)):
                setters.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert setters and {s.split(":")[0] for s in setters} == {"ldm_engine/__init__.py"}, setters


@pytest.mark.parametrize("package", ["schedulers", "pipelines", "train", "ldm_engine.apps.cli"])
def test_every_layer_sets_the_options_before_they_are_read(package):
    # torch reads THP_MEM_ALLOC_ENABLE at its first CPU allocation; importing any layer must
    # have set it by then (and, where the kernel gives huge pages on request, they are used).
    # huggingface_hub reads HF_HUB_OFFLINE when it is imported: it must be on by then too.
    code = (f"import os, {package}, torch, huggingface_hub.constants as hub\n"
            "x = torch.ones(64 * 2**20)\n"
            "huge = [l.split()[1] for l in open('/proc/self/smaps_rollup') if 'AnonHuge' in l]\n"
            "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), huge[0] if huge else 'none',\n"
            "      hub.HF_HUB_OFFLINE)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True, env={"PATH": "/usr/bin:/bin"}).stdout.split()
    assert out[0] == "1" and out[2] == "True"
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text() and out[1] != "none":
        assert int(out[1]) > 0, "the 256 MB tensor got no huge pages"
