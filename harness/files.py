"""Atomic file writes that respect the user's umask.

``tempfile.mkstemp`` creates files readable by the owner only; a result or checkpoint must end
up with the permissions any other file the user creates would get, so the mode is set from the
umask before the temporary file is renamed into place.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from harness.errors import StorageError


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write(f)`` to a temporary file beside ``path``, fsync, then rename.

    Raises StorageError (naming the file and the fix) when the disk is full or not writable;
    the temporary file is removed and an existing ``path`` is left untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        hint = " (the disk is full)" if e.errno == errno.ENOSPC else ""
        raise StorageError(f"could not write {path}: {e.strerror}{hint}. Free space or choose "
                           "another out_dir; files already there are intact.") from None
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
