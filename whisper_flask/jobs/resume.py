"""A running job's resume state: where its transcription stands, saved at every window, and its diarization.

After a crash or a graceful stop the job restarts at its last saved window instead of at 0
(ARCHITECTURE.md, "Durability").
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from whisper_flask.engine.speakers import Diarization
from whisper_flask.engine.windows import Window
from whisper_flask.files import atomic_write
from whisper_flask.jobs.writers import transcript_writes


def resume_path(directory: Path, job_id: str) -> Path:
    """Where an unfinished job's resume state lives."""
    return directory / f"{job_id}.resume.json"


def save_resume(directory: Path, job_id: str, window: Window) -> None:
    """Record where an unfinished job's transcription stands, atomically; StorageFull or WriteFailed if refused."""
    with transcript_writes(), atomic_write(resume_path(directory, job_id)) as file:
        json.dump(dataclasses.asdict(window), file)


def load_resume(directory: Path, job_id: str) -> Window | None:
    """Where an interrupted job stood, if it got past its first window."""
    try:
        return Window(**json.loads(resume_path(directory, job_id).read_text()))
    except FileNotFoundError:
        return None


def diarization_path(directory: Path, job_id: str) -> Path:
    """Where an unfinished job's finished diarization lives."""
    return directory / f"{job_id}.diarization.json"


def save_diarization(directory: Path, job_id: str, diarization: Diarization) -> None:
    """Keep a finished diarization until the job ends, atomically; StorageFull or WriteFailed if refused."""
    with transcript_writes(), atomic_write(diarization_path(directory, job_id)) as file:
        json.dump(diarization.as_dict(), file)


def load_diarization(directory: Path, job_id: str) -> Diarization | None:
    """An interrupted job's finished diarization, if it got that far."""
    try:
        return Diarization.from_dict(json.loads(diarization_path(directory, job_id).read_text()))
    except FileNotFoundError:
        return None


def transcribed_path(directory: Path, job_id: str) -> Path:
    """Where a diarizing job's finished transcription lives."""
    return directory / f"{job_id}.transcribed.json"


def save_transcribed(directory: Path, job_id: str, result: dict[str, Any]) -> None:
    """Keep a finished transcription until the job ends, atomically; StorageFull or WriteFailed if refused."""
    with transcript_writes(), atomic_write(transcribed_path(directory, job_id)) as file:
        json.dump(result, file)


def load_transcribed(directory: Path, job_id: str) -> dict[str, Any] | None:
    """An interrupted job's finished transcription, if it got that far."""
    try:
        result: dict[str, Any] = json.loads(transcribed_path(directory, job_id).read_text())
    except FileNotFoundError:
        return None
    return result
