"""A job's public shapes: the JSON that HTTP answers and webhooks carry, and its transcript links.

Both are built here, below api/ and notify/ and without Flask, so that /progress, /jobs and a
webhook describe a job by one contract, and a link in a webhook or an e-mail is the route that
api/transcription.py serves (ARCHITECTURE.md, "HTTP contract").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode

from whisper_flask.jobs.records import Job, JobStatus, JobView
from whisper_flask.jobs.writers import formats_of

#: The transcript download route as an OpenAPI path template; links are built from it.
DOWNLOAD_PATH = "/download/{job_id}.{fmt}"
#: The same route as the Flask rule api/transcription.py registers.
DOWNLOAD_RULE = DOWNLOAD_PATH.format(job_id="<job_id>", fmt="<fmt>")


def transcript_link(job_id: str, fmt: str, signed: Mapping[str, str]) -> str:
    """The path that downloads one transcript, with its signed query (expires, signature)."""
    return f"{DOWNLOAD_PATH.format(job_id=job_id, fmt=fmt)}?{urlencode(signed)}"


def transcript_links(job: Job, base: str, sign: Callable[[str, str], Mapping[str, str]]) -> dict[str, str]:
    """A completed job's signed links in every format, each starting with `base`; none otherwise or once expired."""
    if job.status is not JobStatus.COMPLETED or job.expired_at:  # an expired job's links would answer 410
        return {}
    return {fmt: base + transcript_link(job.id, fmt, sign(job.id, fmt)) for fmt in formats_of(job.options)}


def job_body(view: JobView, links: Mapping[str, str]) -> dict[str, Any]:
    """A job as /progress, the upload's 202 and a webhook show it; `links` are its transcripts by format."""
    job = view.job
    body: dict[str, Any] = {
        "transcription_id": job.id,
        "status": job.status.value,
        "progress": job.progress,
        "stage": job.stage.value,
        "stage_progress": job.stage_progress,
        "filename": job.filename,
        "duration": job.duration,
        "processed_seconds": job.processed_seconds,
        "eta_seconds": job.eta_seconds,
        # The language the transcript is (or will be) in: detected, else the one asked for.
        "language": job.language or job.options.language,
        "options": job.options.as_dict(),
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "error": job.error,
        "error_code": job.error_code,
    }
    if job.status is JobStatus.PENDING:
        body["queue_position"] = view.queue_position
    if links:
        body["download_url"] = links["txt"]
        body["formats"] = dict(links)
    return body


def job_record(view: JobView, links: Mapping[str, str]) -> dict[str, Any]:
    """The whole record (/jobs): job_body plus who asked, whom to tell, and the record's history."""
    job = view.job
    return {
        **job_body(view, links),
        "source_url": job.source_url,
        "callback_url": job.callback_url,
        "email": job.notify_email,
        "owner": job.owner,
        "model": job.model,
        "started_at": job.started_at,
        "attempts": job.attempts,
        "expired_at": job.expired_at,
    }
