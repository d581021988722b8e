"""Atomic directory writes: build in a temporary sibling, fsync, then rename into place.

An existing directory is replaced only with ``overwrite=True``, by an atomic exchange
(Linux renameat2 RENAME_EXCHANGE), so a reader or a crash sees the complete old version or
the complete new one, never a mix and never nothing. What lands gets the usual permissions under
the user's umask (directories 0777, files 0666, less the umask), not the staging directory's 0700.
Staging directories are named after the
writing process (``.NAME.tmp-PID-…``); one left by a process that no longer runs (killed mid-save)
is removed by the next write to the same target.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adaplex.errors import StorageError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        _fsync(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_permissions(root: Path) -> None:
    """Directories 0777 and files 0666 (0777 where executable), less the umask, under ``root``."""
    mask = _umask()
    for path in [*root.rglob("*"), root]:
        executable = path.is_dir() or path.stat().st_mode & 0o100
        path.chmod((0o777 if executable else 0o666) & ~mask)


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically."""
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result != 0:
        err = ctypes.get_errno()
        raise StorageError(f"cannot replace {b} atomically ({os.strerror(err)}); save to a new directory instead")


def refuse_existing(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise StorageError(f"{target} already exists; choose another directory or pass --overwrite")
    if target.exists() and not target.is_dir():
        raise StorageError(f"{target} exists and is not a directory; choose another path")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_staging(target: Path) -> None:
    """Delete staging siblings of ``target`` whose writing process has exited."""
    for path in target.parent.glob(f".{target.name}.tmp-*-*"):
        pid = path.name.removeprefix(f".{target.name}.tmp-").split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes ``target`` in one atomic step."""
    target = Path(target)
    refuse_existing(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-{os.getpid()}-"))
    try:
        yield staging
        _usual_permissions(staging)
        _fsync_tree(staging)
        if target.exists():
            refuse_existing(target, overwrite)
            _exchange(staging, target)  # staging now holds the old version
        else:
            os.rename(staging, target)
        _fsync(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text_atomic(target: Path, text: str) -> None:
    """Write a text file through a hidden temporary beside it and a rename: a reader sees the old file
    or the whole new one, never a part."""
    if target.is_dir():
        raise StorageError(f"{target} is a directory; give a file path")
    staging = target.with_name(f".{target.name}.tmp")
    try:
        staging.write_text(text, encoding="utf-8")
        staging.replace(target)
    finally:
        staging.unlink(missing_ok=True)
