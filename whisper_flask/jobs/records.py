"""The job record and its states."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from whisper_flask.engine.options import TranscribeOptions


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
    DIARIZING = "diarizing"  # finding who spoke when (after transcribing; its own stage_progress)
    WRITING = "writing"
    WAITING_FOR_STORAGE = "waiting_for_storage"  # the disk is full; the job goes on once space returns
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
    stage_progress: float | None = None  # the current stage's own percentage, where it has one (diarizing)
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
    # (crash_rule.py says why).
    isolated: bool = False
    source_url: str | None = None  # the audio is fetched from here when the job runs
    # Told when the job ends (notify/): a webhook and an address.
    callback_url: str | None = None
    notify_email: str | None = None
    seq: int = 0

    @property
    def speaker_samples(self) -> list[str]:
        """The names in UPLOAD_DIR of its known speakers' voice samples, in the order of their names."""
        return [f"{self.upload_name}.speaker-{index}" for index in range(len(self.options.known_speakers or ()))]


def pending_again(job: Job) -> Job:
    """The job queued again (after a stop or a crash): pending, its stage and progress reset."""
    return dataclasses.replace(
        job, status=JobStatus.PENDING, stage=JobStage.QUEUED, progress=0.0, stage_progress=None,
        processed_seconds=0.0, eta_seconds=None,
    )  # fmt: skip


def ended(job: Job, status: JobStatus, code: str | None, message: str | None) -> Job:
    """The job ended with `status` (and an error code and message, if any); a completed one is done at 100 %."""
    job = dataclasses.replace(
        job, status=status, finished_at=utcnow(), eta_seconds=None, error_code=code, error=message
    )
    if status is JobStatus.COMPLETED:
        job = dataclasses.replace(
            job, stage=JobStage.DONE, progress=100.0, stage_progress=None, processed_seconds=job.duration or 0.0
        )
    return job


@dataclass(frozen=True)
class QueueCounts:
    """How many jobs wait and run, and how many may."""

    pending: int
    in_progress: int
    capacity: int


@dataclass(frozen=True)
class NotifyTargets:
    """Whom to tell when a job ends."""

    callback_url: str | None = None
    email: str | None = None

    @property
    def count(self) -> int:
        """How many notifications the job will send (each counts against NOTIFY_PER_KEY_PER_HOUR)."""
        return (self.callback_url is not None) + (self.email is not None)


@dataclass(frozen=True)
class Submission:
    """A request for a job: its file name and options, the key's name, the client's address, whom to tell."""

    filename: str
    options: TranscribeOptions
    owner: str | None
    client: str | None = None
    notify: NotifyTargets = field(default_factory=NotifyTargets)

    def job(self, job_id: str, model: str, **fields: Any) -> Job:
        """The new pending job this request asks for."""
        return Job(id=job_id, filename=self.filename, options=self.options, model=model, owner=self.owner,
                   callback_url=self.notify.callback_url, notify_email=self.notify.email, **fields)  # fmt: skip


class NotificationKind(str, Enum):
    """How an ended job is announced."""

    WEBHOOK = "webhook"
    EMAIL = "email"


class DeliveryState(str, Enum):
    """Where a notification is: waiting for (another) attempt, delivered, or given up."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True)
class Notification:
    """One announcement of an ended job, kept in the outbox until delivered or given up."""

    id: int
    job_id: str
    kind: NotificationKind
    target: str
    state: DeliveryState
    attempts: int
    next_attempt_at: str
    last_error: str | None
    delivered_at: str | None
    owner: str | None = None  # the key of its job, as JobStore.due_notifications reads it (None elsewhere)


@dataclass(frozen=True)
class JobView:
    """A job as one answer shows it: its record and its queue position, read under the same lock."""

    job: Job
    queue_position: int | None = None  # 1 for the next pending job to start; None unless pending
