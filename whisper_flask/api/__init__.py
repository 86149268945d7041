"""HTTP API blueprints and the JSON shapes they share."""

from __future__ import annotations

import re
from typing import Any

from flask import url_for

from ..errors import ApiError
from ..formats import FORMATS
from ..jobs import get_service
from ..records import Job, JobStatus

_JOB_ID = re.compile(r"[0-9a-f]{32}")


def find_job(job_id: str) -> Job:
    """The job with this id, or 404 job_not_found (ids are checked before any lookup)."""
    job = get_service().get_job(job_id) if _JOB_ID.fullmatch(job_id) else None
    if job is None:
        raise ApiError(404, "job_not_found", f"no job with id {job_id!r}")
    if job.expired_at:
        raise ApiError(410, "expired", f"job {job_id} expired at {job.expired_at}; its files were deleted")
    return job


def progress_body(job: Job) -> dict[str, Any]:
    """The /progress representation of a job."""
    body: dict[str, Any] = {
        "transcription_id": job.id,
        "status": job.status.value,
        "progress": job.progress,
        "stage": job.stage.value,
        "duration": job.duration,
        "processed_seconds": job.processed_seconds,
        "eta_seconds": job.eta_seconds,
        "language": job.language or job.options.get("language"),
    }
    if job.status is JobStatus.PENDING:
        body["queue_position"] = get_service().queue_position(job.id)
    if job.status is JobStatus.COMPLETED:
        formats = {fmt: url_for("transcription.download_transcript", job_id=job.id, fmt=fmt) for fmt in FORMATS}
        body["download_url"] = formats["txt"]
        body["formats"] = formats
    if job.status is JobStatus.FAILED:
        body["error"] = job.error
        body["error_code"] = job.error_code
    return body


def job_record(job: Job) -> dict[str, Any]:
    """The whole record: progress fields plus what was asked and when."""
    return {
        **progress_body(job),
        "filename": job.filename,
        "options": job.options,
        "model": job.model,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "attempts": job.attempts,
        "expired_at": job.expired_at,
    }
