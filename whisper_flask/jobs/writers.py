"""Transcripts in every format, written with whisper.utils' writers, atomically."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from whisper.utils import get_writer

from whisper_flask.exceptions import StorageFull, WriteFailed
from whisper_flask.files import atomic_write, disk_full

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
def transcript_writes() -> Iterator[None]:
    """A refused write in TRANSCRIPT_DIR raises StorageFull if the disk is full (space may return), else WriteFailed."""
    try:
        yield
    except OSError as exc:
        if disk_full(exc):
            raise StorageFull(f"the transcript directory is full: {exc.strerror}") from exc
        raise WriteFailed(exc) from exc


def write_transcripts(result: dict[str, Any], directory: Path, job_id: str) -> None:
    """Write every format, each renamed into place once whole: no reader sees half a file.

    StorageFull or WriteFailed if the directory refuses (transcript_writes). Formats already renamed
    stay: no download serves them before the job completes, and writing again replaces them.
    """
    # Each file is fsynced and renamed as the stack unwinds, after the last format is written; the
    # formats not yet renamed when one fails are removed.
    with transcript_writes(), contextlib.ExitStack() as stack:
        for fmt in FORMATS:
            file = stack.enter_context(atomic_write(transcript_path(directory, job_id, fmt)))
            get_writer(fmt, str(directory)).write_result(result, file=file, options={})
