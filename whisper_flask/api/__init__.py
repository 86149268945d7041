"""HTTP: blueprints, request parsing, the JSON shapes of jobs (jobs/serialize.py), errors and the page.

The top layer: reaches stateful parts only through the service's face; from the packages below it
imports records, constants and pure parsers (ARCHITECTURE.md, "Rooms").
"""

from __future__ import annotations

from typing import Any

from flask import request

from whisper_flask.extension import get_service
from whisper_flask.jobs import serialize
from whisper_flask.jobs.records import Job, JobView


def download_url(job_id: str, fmt: str) -> str:
    """A signed link to the transcript, usable without a key until it expires."""
    signed = get_service().sign_link(job_id, fmt)
    # script_root carries a sub-path's prefix (X-Forwarded-Prefix), as url_for would.
    return request.script_root + serialize.transcript_link(job_id, fmt, signed)


def _links(job: Job) -> dict[str, str]:
    # script_root carries a sub-path's prefix (X-Forwarded-Prefix), as url_for would.
    return serialize.transcript_links(job, request.script_root, get_service().sign_link)


def progress_body(view: JobView) -> dict[str, Any]:
    """The /progress representation of a job."""
    return serialize.job_body(view, _links(view.job))


def job_record(view: JobView) -> dict[str, Any]:
    """The whole record: progress fields plus what was asked and when."""
    return serialize.job_record(view, _links(view.job))
