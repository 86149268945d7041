"""The job record and its states."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum

from .options import TranscribeOptions


class JobStatus(str, Enum):
    """Where a job is in its life; the last three are terminal."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True once the job will never run again."""
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


class JobStage(str, Enum):
    """What a job is doing now (finer than status)."""

    QUEUED = "queued"
    FETCHING = "fetching"
    DECODING_AUDIO = "decoding_audio"
    TRANSCRIBING = "transcribing"
    WRITING = "writing"
    DONE = "done"


def iso(moment: datetime) -> str:
    """A UTC time as the ISO 8601 text stored and served (sortable as text)."""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def utcnow() -> str:
    """The current time as an ISO 8601 UTC timestamp."""
    return iso(datetime.now(timezone.utc))


@dataclass(frozen=True)
class Job:
    """One transcription job, as stored and as served; changed only by replacing it (dataclasses.replace)."""

    id: str
    filename: str
    upload_name: str  # made by the server; for a URL job, where its audio goes once fetched
    options: TranscribeOptions
    model: str
    created_at: str = field(default_factory=utcnow)
    status: JobStatus = JobStatus.PENDING
    stage: JobStage = JobStage.QUEUED
    progress: float = 0.0
    duration: float | None = None
    processed_seconds: float = 0.0
    eta_seconds: float | None = None
    language: str | None = None
    error: str | None = None
    error_code: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    attempts: int = 0
    expired_at: str | None = None
    owner: str | None = None  # the name of the API key that submitted it; None with WHISPER_FLASK_AUTH=off
    # It was running beside others when the process died, so it runs alone until it ends
    # (registry.recover says why).
    isolated: bool = False
    source_url: str | None = None  # the audio is fetched from here when the job runs
    seq: int = 0


@dataclass(frozen=True)
class JobView:
    """A job as one answer shows it: its record and its queue position, read under the same lock."""

    job: Job
    queue_position: int | None = None  # 1 for the next pending job to start; None unless pending
