"""Files written whole or not at all.

A file or folder is built under a hidden name beside its path (unique to the process and thread)
and renamed into place: another process sees the old one or the new one, never half of one, and
an interrupted build leaves nothing under the real name.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path


def beside(path: Path, tag: str) -> Path:
    """A hidden name next to ``path``, unique to this process and thread."""
    return path.with_name(f".{path.name}.{tag}.{os.getpid()}.{threading.get_ident()}")


def remove(path: Path) -> None:
    """Delete ``path``, a file or a folder, if it is there."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def written(path: Path, write: Callable[[Path], object]) -> Path:
    """``path``, written by ``write`` beside it and renamed into place: whole, or absent when
    ``write`` fails. The hidden name ends as ``path`` does, for writers that read the format from
    the suffix (``savefig``, ``soundfile``)."""
    partial = beside(path, "partial")
    partial = partial.with_name(partial.name + path.suffix)
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        remove(partial)
    return path


def built_once(path: Path, build: Callable[[Path], Path]) -> Path:
    """``path``, built by ``build`` on first use. Built beside it and renamed: another process
    (test workers on a fresh machine) sees it whole or not at all, and an interrupted build
    leaves nothing behind."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = beside(path, "partial")
    try:
        build(partial)
        os.replace(partial, path)
    except OSError:
        if not path.exists():
            raise
        # else a second process got there first (a folder, Turbo's, cannot replace another)
    finally:
        remove(partial)
    return path


def check_folder(path: str | Path) -> None:
    """An ``OSError`` naming ``path`` when it cannot be, or become, a folder this user writes in,
    found without making it: a command refused after this check leaves no empty folder behind."""
    path = Path(path)
    there = path.absolute()
    while not there.exists() and there != there.parent:  # the nearest part that is there
        there = there.parent
    if there.exists() and not there.is_dir():
        code = errno.EEXIST if there == path.absolute() else errno.ENOTDIR  # what mkdir would raise
        raise OSError(code, os.strerror(code), str(path))
    try:  # a file made and dropped at once: os.access says yes to root where nobody writes (/proc)
        with tempfile.TemporaryFile(dir=there):
            pass
    except OSError as e:  # its error names a file the user never gave, and procfs says ENOENT
        why = f"no file can be made in {there} ({e.strerror})"
        raise PermissionError(errno.EACCES, why, str(path)) from None
