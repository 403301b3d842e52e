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


def atomic_write(path: Path, write: bytes | Callable[[BinaryIO], object]) -> None:
    """Write ``path`` atomically: ``write`` is the content, or a function that writes it to a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(write, bytes):
                handle.write(write)
            else:
                write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
