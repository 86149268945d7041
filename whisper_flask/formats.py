"""Transcript formats, written with whisper.utils' writers, atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from whisper.utils import get_writer

from .engine import Window

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


def write_transcripts(result: dict[str, Any], directory: Path, job_id: str) -> None:
    """Write every format to temporary files, then rename them all: no reader sees half a file."""
    temporary: dict[str, str] = {}
    try:
        for fmt in FORMATS:
            with tempfile.NamedTemporaryFile(
                "w", encoding="utf-8", dir=directory, prefix=f".{job_id}.", suffix=f".{fmt}", delete=False
            ) as file:
                temporary[fmt] = file.name
                get_writer(fmt, str(directory)).write_result(result, file=file, options={})
                file.flush()
                os.fsync(file.fileno())
        for fmt, name in temporary.items():
            os.replace(name, transcript_path(directory, job_id, fmt))
    except BaseException:
        for name in temporary.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        raise


def delete_transcripts(directory: Path, job_id: str) -> None:
    """Remove a job's transcripts, whichever exist."""
    for fmt in FORMATS:
        transcript_path(directory, job_id, fmt).unlink(missing_ok=True)


def _resume_path(directory: Path, job_id: str) -> Path:
    return directory / f"{job_id}.resume.json"


def save_resume(directory: Path, job_id: str, window: Window) -> None:
    """Record where an unfinished job's transcription stands, atomically (temp file, fsync, rename)."""
    with tempfile.NamedTemporaryFile("w", dir=directory, prefix=f".{job_id}.", suffix=".resume", delete=False) as file:
        json.dump(dataclasses.asdict(window), file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(file.name, _resume_path(directory, job_id))


def load_resume(directory: Path, job_id: str) -> Window | None:
    """Where an interrupted job stood, if it got past its first window."""
    try:
        return Window(**json.loads(_resume_path(directory, job_id).read_text()))
    except FileNotFoundError:
        return None


def delete_resume(directory: Path, job_id: str) -> None:
    """Forget a job's resume state (it has ended)."""
    _resume_path(directory, job_id).unlink(missing_ok=True)
