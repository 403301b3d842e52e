"""Writing files so that a crash or a full disk never leaves a half-written one under its real name.

Every file fedsp writes whole (results, checkpoints, client states, the KD cache) goes through
:func:`atomic_write`: a temporary file of a unique name in the same folder, synced, then renamed
over the target; on any failure the temporary file is removed. Concurrent writers of the same
target therefore never collide on a temporary name, and the last complete write wins.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"


class WriteError(OSError):
    """A file could not be written for a reason of the disk (no space, no permission, read-only): the
    run's own problem, never a client's. ``filename`` is the file meant (not its temporary name)."""


def atomic_write(path: Path, write: bytes | Callable[[BinaryIO], object]) -> None:
    """Write ``path`` atomically: ``write`` is the content, or a function that writes it to a file.

    A failure of the disk raises :class:`WriteError` naming ``path``, whoever noticed it first (torch's
    writer reports a full disk as ``RuntimeError: ... unexpected pos``, the OSError only as its context).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        with os.fdopen(fd, "wb") as handle:
            if isinstance(write, bytes):
                handle.write(write)
            else:
                write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = disk_error(err)
        if cause is None or isinstance(err, WriteError):
            raise
        raise WriteError(cause.errno, cause.strerror, str(path)) from err


def disk_error(err: BaseException) -> OSError | None:
    """The OSError with an errno behind ``err`` (itself, or what it was raised from or during), or None."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno is not None:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete what a killed writer left behind in ``folder`` (``.<name>.<random>.tmp``); the removed paths."""
    stale = [p for p in Path(folder).glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def io_reason(err: OSError) -> str:
    """An OS error in a few words, without the traceback (``no space left on the device``...)."""
    names = {
        errno.ENOSPC: "no space left on the device",
        errno.EACCES: "permission denied",
        errno.EROFS: "read-only file system",
        errno.ENOTDIR: "a part of the path is not a folder",
        errno.EDQUOT: "disk quota exceeded",
        errno.EPERM: "operation not permitted",
        errno.EISDIR: "it is a folder",
        errno.ELOOP: "a loop of symbolic links",
    }
    return names.get(err.errno or 0, err.strerror or type(err).__name__)
