"""Job records, listing, cancellation and queue state."""

from __future__ import annotations

import dataclasses

from flask import Blueprint, Response, jsonify, request

from ..errors import ApiError
from ..records import JobStatus, JobView
from ..service import get_service
from . import job_record
from .auth import principal, require_key

bp = Blueprint("jobs", __name__)
require_key(bp)


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name, str(default))
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ApiError(400, "invalid_query", f"{name} must be an integer from {low} to {high}", field=name)
    return int(raw)


@bp.get("/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    """The whole record of one job."""
    return jsonify(job_record(get_service().view(job_id, principal())))


@bp.get("/jobs")
def list_jobs() -> Response:
    """Jobs newest first, filtered by status, paged by limit and offset."""
    raw_status = request.args.get("status") or None
    statuses = [status.value for status in JobStatus]
    if raw_status is not None and raw_status not in statuses:
        raise ApiError(400, "invalid_query", f"status must be one of {', '.join(statuses)}", field="status")
    limit = _int_arg("limit", 50, 1, 1000)
    offset = _int_arg("offset", 0, 0, 10**9)
    views = get_service().views(JobStatus(raw_status) if raw_status else None, limit, offset, principal())
    return jsonify({"jobs": [job_record(view) for view in views], "limit": limit, "offset": offset})


@bp.delete("/jobs/<job_id>")
def cancel_job(job_id: str) -> Response:
    """Cancel a job and delete its files; a finished job is returned unchanged."""
    return jsonify(job_record(JobView(get_service().cancel(job_id, principal()))))


@bp.get("/queue")
def get_queue() -> Response:
    """How many jobs wait and run, and the limits."""
    return jsonify(dataclasses.asdict(get_service().queue_stats()))
