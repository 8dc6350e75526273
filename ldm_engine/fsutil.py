"""Crash-safe writes: nothing a user already has is lost when a write is interrupted.

A file is written beside its destination under a temporary name, flushed and fsynced, then renamed
over the destination (rename is atomic on POSIX within one filesystem); the directory is fsynced so
the rename itself survives a power cut.

A folder cannot be renamed over a non-empty folder, so replacing one takes two steps, and a kill
between them must not leave the name empty. On Linux ``renameat2(RENAME_EXCHANGE)`` swaps the old
and the new folder in one step. Where the filesystem lacks it, the old folder is renamed aside
under a name that says so (``.old``) and the next write or read of that destination puts it back
if the new one never arrived. So at every instant the name holds the old or the new version, or
(only in that fallback, between its two renames) nothing, with the old one recoverable beside it.

Temporaries carry their owner's host and pid: ``.NAME.ldm-HOST-PID-RAND.tmp`` (work in progress,
or garbage) and ``.NAME.ldm-HOST-PID-RAND.old`` (a complete previous version moved aside). The next
write to NAME removes the ones whose owner is dead (``kill(pid, 0)`` fails with ESRCH), and only
those: a live writer's temporary is never touched, nor one made on another host.

Modes: what is written gets the mode a plain ``open()`` / ``mkdir()`` would give there, never
``mkstemp``'s private 0600. Temporaries are created with ``open(..., 0o666)`` / ``mkdir(...,
0o777)``, so the kernel applies the umask (or a default ACL); that mode, read back from the fresh
temporary, is then given to every file and folder written, because some writers (safetensors'
``save_file``) write through their own 0600 temp file and rename it over ours. The umask itself
is never read or changed (``os.umask`` is process-wide: reading it by setting it races with
other threads creating files).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

# Temporary kinds: work in progress (or garbage), and a complete previous version set aside.
TMP, OLD = "tmp", "old"
# Leave room under NAME_MAX (255 bytes) for the ".ldm-HOST-PID-RAND.old" tail.
_MAX_STEM_BYTES = 180


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


# --- naming and ownership of temporaries -------------------------------------------------------

def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _stem(dest: Path) -> str:
    """dest's name as used in its temporaries; a very long name is shortened with its hash."""
    name = dest.name
    if len(name.encode()) <= _MAX_STEM_BYTES:
        return name
    return name[:100] + "~" + hashlib.sha256(name.encode()).hexdigest()[:16]


def temp_path(dest: Path, kind: str = TMP) -> Path:
    """A fresh temporary name beside dest, owned by this process."""
    return dest.parent / (f".{_stem(dest)}.ldm-{_host_tag()}-{os.getpid()}-"
                          f"{secrets.token_hex(4)}.{kind}")


def _temporaries(dest: Path) -> list[tuple[Path, str, int]]:
    """(path, kind, owner pid) of every temporary of dest made on this host."""
    pattern = re.compile(rf"\.{re.escape(_stem(dest))}\.ldm-{_host_tag()}-(\d+)-[0-9a-f]{{8}}"
                         rf"\.({TMP}|{OLD})")
    try:
        names = os.listdir(dest.parent)
    except OSError:
        return []
    found = []
    for name in names:
        m = pattern.fullmatch(name)
        if m:
            found.append((dest.parent / name, m.group(2), int(m.group(1))))
    return found


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a zombie counts as alive until reaped)."""
    if pid <= 0:
        return True                       # kill(0 or -n) addresses groups: never "dead"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                       # exists, owned by another user
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def restore_aside(dest: str | os.PathLike) -> bool:
    """If dest is missing because a replace died between its two renames, put the old one back.

    Only a ``.old`` whose owner is dead is restored (a live writer is about to rename its new
    version in). Several (which needs several crashed runs with no write in between): the most
    recently moved one. Returns whether dest was restored. Best effort: errors leave things be.
    """
    dest = Path(dest)
    if os.path.lexists(dest):
        return False
    asides = [p for p, kind, pid in _temporaries(dest) if kind == OLD and not pid_alive(pid)]
    for aside in sorted(asides, key=_ctime, reverse=True):
        with contextlib.suppress(OSError):
            _rename_noreplace(aside, dest)
            return True
    return False


def _ctime(path: Path) -> float:
    try:
        return path.lstat().st_ctime       # rename updates ctime: the last one moved aside
    except OSError:
        return 0.0


def clean_stale(dest: str | os.PathLike) -> None:
    """Before writing dest: restore an interrupted replace, then remove dead owners' temporaries."""
    dest = Path(dest)
    restore_aside(dest)
    for path, _, pid in _temporaries(dest):
        if not pid_alive(pid):
            _remove(path)


# --- renameat2 ---------------------------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
# What renameat2 answers where the kernel (ENOSYS) or the filesystem (EINVAL, ENOTSUP) lacks it.
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def _load_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2       # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2); False where it or the flag is unsupported, OSError for any other failure."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the system cannot."""
    return renameat2(a, b, _RENAME_EXCHANGE)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename src to dst, failing (FileExistsError) rather than replacing an existing dst."""
    if not renameat2(src, dst, _RENAME_NOREPLACE):
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "already exists", str(dst))
        os.rename(src, dst)                  # the check and the rename race; nothing better here


def replace_dir(new: Path, dest: Path) -> None:
    """Put the folder `new` at dest, where a previous version exists; the old one is deleted.

    With RENAME_EXCHANGE the two swap in one step, so dest is never missing. Without it: old
    aside as ``.old``, new in, old renamed to a ``.tmp`` and deleted; a kill between the first
    two renames leaves dest missing and the ``.old`` that `restore_aside` puts back.
    """
    if exchange(new, dest):
        fsync_dir(dest.parent)
        _remove(new)                          # `new` now holds the old version
        return
    aside = temp_path(dest, OLD)
    os.rename(dest, aside)
    try:
        os.rename(new, dest)
    except BaseException:
        os.rename(aside, dest)
        raise
    fsync_dir(dest.parent)
    garbage = temp_path(dest, TMP)            # never restored, even if deleting is interrupted
    os.rename(aside, garbage)
    _remove(garbage)


# --- atomic writes -----------------------------------------------------------------------------

def _create_temp(dest: Path, make) -> Path:
    for _ in range(100):
        tmp = temp_path(dest)
        try:
            make(tmp)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(dest))


def _create_file(path: Path) -> None:
    # 0o666 through the umask: the mode a plain open(path, "w") gives.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))


def _set_mode(path: Path, mode: int) -> None:
    st = path.lstat()
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):    # never through a symlink
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)


def _set_tree_modes(root: Path, file_mode: int, dir_mode: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            _set_mode(Path(dirpath, name), file_mode)
        for name in dirnames:
            _set_mode(Path(dirpath, name), dir_mode)


def _new_file_mode(directory: Path) -> int:
    """The mode the kernel gives a file created with 0o666 in directory (umask, default ACL)."""
    probe = _create_temp(directory / "mode", _create_file)
    try:
        return stat.S_IMODE(probe.lstat().st_mode)
    finally:
        probe.unlink()


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in dest's directory; on success it replaces dest, else it is removed.

    The temporary exists (empty, mode 0o666 & ~umask) when yielded; whatever the writer does
    with it, dest ends with that mode, as if written by a plain open().
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)
    tmp = _create_temp(dest, _create_file)
    file_mode = stat.S_IMODE(tmp.lstat().st_mode)
    try:
        yield tmp
        _set_mode(tmp, file_mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes dest only if the block finishes without error.

    With overwrite, an existing dest is replaced by `replace_dir` (one atomic swap on Linux).
    Every folder in it ends 0o777 & ~umask and every file 0o666 & ~umask (what mkdir and open
    give), whatever modes the writers used: model folders hold no executables.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)
    if os.path.lexists(dest) and not overwrite:
        raise FileExistsError(f"{dest} already exists (pass overwrite=True to replace it)")
    tmp = _create_temp(dest, lambda p: os.mkdir(p, 0o777))
    try:
        dir_mode, file_mode = stat.S_IMODE(tmp.lstat().st_mode), _new_file_mode(tmp)
        yield tmp
        _set_tree_modes(tmp, file_mode, dir_mode)
        fsync_tree(tmp)
        if os.path.lexists(dest):
            if not overwrite:
                raise FileExistsError(f"{dest} appeared while it was being written")
            replace_dir(tmp, dest)
        else:
            _rename_noreplace(tmp, dest)
            fsync_dir(dest.parent)
    finally:
        _remove(tmp)
