"""Transcripts in every format, written with whisper.utils' writers, atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from whisper.utils import get_writer

#: Download format -> MIME type (werkzeug appends "; charset=utf-8" to the text/ ones).
FORMATS = {
    "txt": "text/plain",
    "srt": "application/x-subrip",
    "vtt": "text/vtt",
    "json": "application/json",
    "tsv": "text/tab-separated-values",
}


def transcript_path(directory: Path, job_id: str, fmt: str) -> Path:
    """Where a job's transcript in one format lives (job_id and fmt are validated by callers)."""
    return directory / f"{job_id}.{fmt}"


@contextlib.contextmanager
def temporary_beside(directory: Path, job_id: str, suffix: str) -> Iterator[IO[str]]:
    """A hidden text file beside its final name: fsynced on success, removed on failure."""
    file = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=directory, prefix=f".{job_id}.", suffix=suffix, delete=False
    )
    try:
        with file:
            yield file
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        os.unlink(file.name)
        raise


def write_transcripts(result: dict[str, Any], directory: Path, job_id: str) -> None:
    """Write every format to temporary files, then rename them all: no reader sees half a file."""
    written: dict[str, str] = {}
    try:
        for fmt in FORMATS:
            with temporary_beside(directory, job_id, f".{fmt}") as file:
                written[fmt] = file.name
                get_writer(fmt, str(directory)).write_result(result, file=file, options={})
        for fmt, name in written.items():
            os.replace(name, transcript_path(directory, job_id, fmt))
    except BaseException:
        for name in written.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        raise
