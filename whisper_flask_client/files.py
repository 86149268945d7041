"""Files written whole or not at all, and durably: transcripts and the state file.

A reader sees the old file or the new one, never half of one, and after the call returns a power loss keeps
the new one: an interrupted run must leave no empty transcript that a later run would skip as done, and the
state file must not forget a job id the service already has.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` whole and durably, as a new file of `mode` less the process's umask."""
    # os.open with O_EXCL, not mkstemp: mkstemp forces 0600, and reading the umask to widen it again means
    # setting it, which races with other threads. The kernel applies the umask to `mode` here.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    while True:
        temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            handle = os.open(temp, flags, mode)
            break
        except FileExistsError:  # another writer's temp file of the same random name: draw again
            continue
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # the data is on disk before the name points at it
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable: the new name is on disk when this returns."""
    handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
