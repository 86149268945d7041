"""HTTP API blueprints and the JSON shapes they share; each body is built from one JobView."""

from __future__ import annotations

from typing import Any

from flask import url_for

from whisper_flask.extension import get_service
from whisper_flask.jobs.records import JobStatus, JobView
from whisper_flask.jobs.writers import FORMATS


def download_url(job_id: str, fmt: str) -> str:
    """A signed link to the transcript, usable without a key until it expires."""
    signed = get_service().sign_link(job_id, fmt)
    return url_for(
        "transcription.download_transcript",
        job_id=job_id,
        fmt=fmt,
        expires=signed["expires"],
        signature=signed["signature"],
    )


def progress_body(view: JobView) -> dict[str, Any]:
    """The /progress representation of a job."""
    job = view.job
    body: dict[str, Any] = {
        "transcription_id": job.id,
        "status": job.status.value,
        "progress": job.progress,
        "stage": job.stage.value,
        "duration": job.duration,
        "processed_seconds": job.processed_seconds,
        "eta_seconds": job.eta_seconds,
        "language": job.language or job.options.language,
    }
    if job.status is JobStatus.PENDING:
        body["queue_position"] = view.queue_position
    if job.status is JobStatus.COMPLETED:
        formats = {fmt: download_url(job.id, fmt) for fmt in FORMATS}
        body["download_url"] = formats["txt"]
        body["formats"] = formats
    if job.status is JobStatus.FAILED:
        body["error"] = job.error
        body["error_code"] = job.error_code
    return body


def job_record(view: JobView) -> dict[str, Any]:
    """The whole record: progress fields plus what was asked and when."""
    job = view.job
    return {
        **progress_body(view),
        "filename": job.filename,
        "source_url": job.source_url,
        "callback_url": job.callback_url,
        "email": job.notify_email,
        "owner": job.owner,
        "options": job.options.as_dict(),
        "model": job.model,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "attempts": job.attempts,
        "expired_at": job.expired_at,
    }
