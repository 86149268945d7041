"""The one way the service writes a file that readers must never see half-written (ARCHITECTURE.md, "Durability")."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

#: The errors of a filesystem with no room left for this user: out of space, or over its quota.
_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(error: OSError) -> bool:
    """Whether a failed write means the disk is full (it works again once space returns), not a refusal."""
    return error.errno in _FULL


#: The mode of every file the service makes: its owner's alone, whatever the process's umask.
FILE_MODE = 0o600


def create_private(path: Path) -> None:
    """Make `path` if it is missing, and give it FILE_MODE either way (a file from an older version included)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(
    target: Path, mode: Literal["w", "wb"] = "w", *, permissions: int = FILE_MODE, replace: bool = True
) -> Iterator[IO[Any]]:
    """A hidden file beside `target`, renamed onto it once written and fsynced; removed if the block fails.

    With `replace=False` an existing `target` wins (FileExistsError): of two processes creating the
    same file at once, exactly one succeeds, and both then read the same content.
    """
    encoding = "utf-8" if mode == "w" else None
    file = tempfile.NamedTemporaryFile(
        mode, encoding=encoding, dir=target.parent, prefix=f".{target.name}.", delete=False
    )
    try:
        with file:
            os.chmod(file.name, permissions)
            yield file
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(file.name, target)
        else:
            os.link(file.name, target)  # fails if target exists, unlike a rename
            os.unlink(file.name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(file.name)
        raise
