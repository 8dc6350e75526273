"""Crash-safe writes (ldm_engine.fsutil): modes, atomic folder replacement, stale temporaries.

A killed write is simulated by a child process that SIGKILLs itself at the chosen instant, so
nothing of the dying process (no finally, no except) gets to tidy up; tests/test_kill.py kills
real `ldm convert` runs at random moments.
"""

import ctypes
import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from ldm_engine import fsutil
from ldm_engine.components import check_model_folder
from ldm_engine.convert import convert
from pipelines.params import GenerationParams
from pipelines.pnginfo import save_png

UMASKS = [0o022, 0o077, 0o002]


@pytest.fixture
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def temporaries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".ldm-" in p.name)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def write_tree(root: Path, text: str) -> None:
    (root / "sub").mkdir()
    (root / "sub/file.txt").write_text(text)
    (root / "top.txt").write_text(text)


def read_tree(root: Path) -> str:
    texts = {(root / "sub/file.txt").read_text(), (root / "top.txt").read_text()}
    assert len(texts) == 1, "a folder mixing two versions"
    return texts.pop()


# --- defect 3: modes follow the umask like a plain open() / mkdir() ----------------------------

@pytest.mark.parametrize("umask", UMASKS, indirect=True)
def test_atomic_file_modes_follow_the_umask(umask, tmp_path):
    dest = tmp_path / "a.bin"
    fsutil.write_bytes_atomic(dest, b"x")
    assert mode(dest) == 0o666 & ~umask
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    assert mode(dest) == mode(plain)
    # Replacing a file gives the new one the umask's mode, as writing a fresh file would.
    os.chmod(dest, 0o640)
    with fsutil.atomic_path(dest) as tmp:
        assert mode(tmp) == 0o666 & ~umask           # already so while being written
        with open(tmp, "wb") as f:
            f.write(b"y")
    assert mode(dest) == 0o666 & ~umask and dest.read_bytes() == b"y"


@pytest.mark.parametrize("umask", UMASKS, indirect=True)
def test_atomic_dir_modes_follow_the_umask(umask, tmp_path):
    dest = tmp_path / "folder"
    with fsutil.atomic_dir(dest) as tmp:
        write_tree(tmp, "new")
    assert mode(dest) == 0o777 & ~umask and mode(dest / "sub") == 0o777 & ~umask
    assert mode(dest / "top.txt") == mode(dest / "sub/file.txt") == 0o666 & ~umask
    with fsutil.atomic_dir(dest, overwrite=True) as tmp:
        write_tree(tmp, "newer")
    assert mode(dest) == 0o777 & ~umask and read_tree(dest) == "newer"


@pytest.mark.parametrize("umask", [0o022, 0o077], indirect=True)
def test_converted_models_and_pngs_are_not_private(umask, tiny_dir, tmp_path):
    """The files users share: a converted folder, single files, a generated PNG."""
    convert(tiny_dir, tmp_path / "folder")
    convert(tiny_dir, tmp_path / "model.safetensors")
    convert(tiny_dir, tmp_path / "model.ckpt")
    save_png(Image.new("RGB", (8, 8)), tmp_path / "image.png", GenerationParams(prompt="a cat", height=8, width=8))
    for path in [tmp_path / "folder", *(tmp_path / "folder").rglob("*")]:
        want = 0o777 & ~umask if path.is_dir() else 0o666 & ~umask
        assert mode(path) == want, path
    for name in ("model.safetensors", "model.ckpt", "image.png"):
        assert mode(tmp_path / name) == 0o666 & ~umask, name
    assert temporaries(tmp_path) == []


# --- defect 9: a folder is replaced in one step, or recoverably --------------------------------

def test_replace_swaps_in_one_step_where_renameat2_exists(tmp_path, monkeypatch):
    dest = tmp_path / "folder"
    with fsutil.atomic_dir(dest) as tmp:
        write_tree(tmp, "old")
    # Every rename made while replacing: none may take dest away (the fallback's first does).
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (renames.append((a, b)), real_rename(a, b)))
    with fsutil.atomic_dir(dest, overwrite=True) as tmp:
        write_tree(tmp, "new")
    assert read_tree(dest) == "new" and temporaries(tmp_path) == []
    assert fsutil._renameat2 is not None, "glibc without renameat2: only the fallback is tested"
    assert not [r for r in renames if Path(r[0]) == dest], renames


def test_exchange_swaps_two_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a/x").write_text("a")
    (tmp_path / "b").mkdir()
    assert fsutil.exchange(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b/x").read_text() == "a" and not any((tmp_path / "a").iterdir())


@pytest.mark.parametrize("err", [errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP])
def test_unsupported_renameat2_falls_back_to_two_renames(err, tmp_path, monkeypatch):
    def unsupported(*args):
        ctypes.set_errno(err)
        return -1
    monkeypatch.setattr(fsutil, "_renameat2", unsupported)
    dest = tmp_path / "folder"
    with fsutil.atomic_dir(dest) as tmp:
        write_tree(tmp, "old")
    with fsutil.atomic_dir(dest, overwrite=True) as tmp:
        write_tree(tmp, "new")
    assert read_tree(dest) == "new" and temporaries(tmp_path) == []


def test_other_renameat2_errors_are_raised(tmp_path, monkeypatch):
    def denied(*args):
        ctypes.set_errno(errno.EACCES)
        return -1
    monkeypatch.setattr(fsutil, "_renameat2", denied)
    with pytest.raises(PermissionError):
        fsutil.exchange(tmp_path / "a", tmp_path / "b")


def test_a_failed_write_leaves_the_old_folder(tmp_path):
    dest = tmp_path / "folder"
    with fsutil.atomic_dir(dest) as tmp:
        write_tree(tmp, "old")
    with pytest.raises(RuntimeError), fsutil.atomic_dir(dest, overwrite=True) as tmp:
        write_tree(tmp, "new")
        raise RuntimeError("conversion failed")
    assert read_tree(dest) == "old" and temporaries(tmp_path) == []


def test_a_folder_that_appears_meanwhile_is_not_replaced(tmp_path):
    dest = tmp_path / "folder"
    with pytest.raises(FileExistsError), fsutil.atomic_dir(dest) as tmp:
        write_tree(tmp, "mine")
        dest.mkdir()                          # someone else's, created while we wrote
    assert dest.is_dir() and not any(dest.iterdir()) and temporaries(tmp_path) == []


def test_very_long_names(tmp_path):
    dest = tmp_path / ("m" * 250)
    with fsutil.atomic_dir(dest) as tmp:
        write_tree(tmp, "old")
    with fsutil.atomic_dir(dest, overwrite=True) as tmp:
        write_tree(tmp, "new")
    fsutil.write_bytes_atomic(tmp_path / ("f" * 250), b"x")
    assert read_tree(dest) == "new" and temporaries(tmp_path) == []


KILLED_FALLBACK = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    from ldm_engine import fsutil
    fsutil._renameat2 = None                  # a filesystem without RENAME_EXCHANGE
    dest, new = Path(sys.argv[1]), Path(sys.argv[2])
    real_rename = os.rename
    def rename(a, b):
        if Path(b) == dest:                   # the second rename: the new folder going in
            os.kill(os.getpid(), signal.SIGKILL)
        real_rename(a, b)
    os.rename = rename
    with fsutil.atomic_dir(dest, overwrite=True) as tmp:
        shutil.copytree(new, tmp, dirs_exist_ok=True)
""")


def kill_between_the_renames(dest: Path, new: Path) -> None:
    """Run a fallback replace of dest by a copy of `new` that dies between its two renames."""
    child = subprocess.run([sys.executable, "-c", KILLED_FALLBACK, str(dest), str(new)],
                           capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert not dest.exists()                  # the window the fallback cannot avoid
    kinds = sorted(name.rsplit(".", 1)[1] for name in temporaries(dest.parent))
    assert kinds == ["old", "tmp"]            # old version aside, new one never renamed in


def test_the_next_write_restores_a_fallback_killed_between_its_renames(tmp_path):
    dest, new = tmp_path / "folder", tmp_path / "src"
    (new).mkdir()
    write_tree(new, "new")
    with fsutil.atomic_dir(dest) as tmp:
        write_tree(tmp, "old")
    kill_between_the_renames(dest, new)
    # Without overwrite, the restored old folder is found, and kept.
    with pytest.raises(FileExistsError), fsutil.atomic_dir(dest) as tmp:
        write_tree(tmp, "other")
    assert read_tree(dest) == "old"
    assert temporaries(tmp_path) == []        # the dead run's new half was removed too
    kill_between_the_renames(dest, new)
    with fsutil.atomic_dir(dest, overwrite=True) as tmp:
        write_tree(tmp, "newer")
    assert read_tree(dest) == "newer" and temporaries(tmp_path) == []


def test_reading_a_model_restores_a_fallback_killed_between_its_renames(tiny_dir, tmp_path):
    dest = tmp_path / "model"
    shutil.copytree(tiny_dir, dest)
    kill_between_the_renames(dest, tiny_dir)
    assert check_model_folder(dest) == dest   # the read finds the old model back in place
    assert (dest / "model_index.json").is_file()


def test_an_aside_copy_of_a_live_writer_is_left_alone(tmp_path):
    dest = tmp_path / "folder"
    aside = fsutil.temp_path(dest, fsutil.OLD)          # ours: this process is alive
    aside.mkdir()
    assert not fsutil.restore_aside(dest) and aside.is_dir() and not dest.exists()


def test_stale_temporaries_of_dead_owners_are_removed_and_only_those(tmp_path):
    dest = tmp_path / "model"
    dead, host = dead_pid(), fsutil._host_tag()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        def name(pid, kind, host=host, stem="model"):
            return f".{stem}.ldm-{host}-{pid}-0123abcd.{kind}"
        stale = [name(dead, "tmp"), name(dead, "old")]     # .old with dest present: garbage
        kept = [name(os.getpid(), "tmp"), name(sleeper.pid, "tmp"), name(sleeper.pid, "old"),
                name(dead, "tmp", host="00000000"),        # another host's: cannot tell
                name(dead, "tmp", stem="model2"),          # another destination's
                ".model.1234.tmp", ".model.ldm-junk.tmp", "model.bak"]   # not ours
        dest.mkdir()
        for n in stale + kept:
            (tmp_path / n).mkdir()
            (tmp_path / n / "payload").write_bytes(b"x" * 100)
        with fsutil.atomic_dir(dest, overwrite=True) as tmp:
            write_tree(tmp, "new")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["model"])
        # A single-file write cleans up after dead writers of that file the same way.
        (tmp_path / name(dead, "tmp", stem="w.bin")).write_bytes(b"half")
        fsutil.write_bytes_atomic(tmp_path / "w.bin", b"all")
        assert not (tmp_path / name(dead, "tmp", stem="w.bin")).exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_pid_alive():
    assert fsutil.pid_alive(os.getpid())
    assert not fsutil.pid_alive(dead_pid())
    assert fsutil.pid_alive(1)                # exists (EPERM as non-root counts as alive)
    assert fsutil.pid_alive(0)                # never "dead": kill(0) addresses a group
