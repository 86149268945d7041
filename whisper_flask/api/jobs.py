"""Job records, listing, cancellation and queue state."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, jsonify, request

from whisper_flask.api import job_record
from whisper_flask.api.auth import principal, require_key
from whisper_flask.api.errors import ApiError
from whisper_flask.extension import get_service
from whisper_flask.jobs.records import JobStatus, JobView
from whisper_flask.notify.messages import SIGNATURE_HEADER

bp = Blueprint("jobs", __name__)
require_key(bp)


@dataclass(frozen=True)
class IntQuery:
    """An integer query parameter: its default and the range the parser accepts."""

    default: int
    low: int
    high: int

    @property
    def schema(self) -> dict[str, Any]:
        """Its JSON Schema, as OPTIONS and the OpenAPI document describe it."""
        return {"type": "integer", "minimum": self.low, "maximum": self.high, "default": self.default}


#: The job list's paging parameters; describe.py documents these ranges.
PAGING = {"limit": IntQuery(50, 1, 1000), "offset": IntQuery(0, 0, 10**9)}


def _int_arg(name: str) -> int:
    query = PAGING[name]
    raw = request.args.get(name, str(query.default))
    if not (raw.isascii() and raw.isdigit()) or not query.low <= int(raw) <= query.high:  # "²".isdigit() is True
        raise ApiError(400, "invalid_query", f"{name} must be an integer from {query.low} to {query.high}", field=name)
    return int(raw)


@bp.get("/jobs/<job_id>", provide_automatic_options=False)  # describe.py answers OPTIONS
def get_job(job_id: str) -> Response:
    """The whole record of one job, with the delivery state of its webhook and e-mail."""
    view, notifications = get_service().view_with_notifications(job_id, principal())
    record = job_record(view)
    record["notifications"] = [
        {key: value for key, value in dataclasses.asdict(notification).items() if key not in ("id", "job_id")}
        for notification in notifications
    ]
    return jsonify(record)


@bp.get("/webhook-secret")
def get_webhook_secret() -> Response:
    """The secret that signs this key's webhooks, and how the signature is made."""
    return jsonify(
        {
            "secret": get_service().webhook_secret(principal()),
            "header": SIGNATURE_HEADER,
            "signature": "t=<unix time>,v1=<hex HMAC-SHA256(secret, '<unix time>.' + raw body)>",
        }
    )


@bp.get("/jobs", provide_automatic_options=False)
def list_jobs() -> Response:
    """Jobs newest first, filtered by status, paged by limit and offset."""
    raw_status = request.args.get("status") or None
    statuses = [status.value for status in JobStatus]
    if raw_status is not None and raw_status not in statuses:
        raise ApiError(400, "invalid_query", f"status must be one of {', '.join(statuses)}", field="status")
    limit = _int_arg("limit")
    offset = _int_arg("offset")
    views = get_service().views(JobStatus(raw_status) if raw_status else None, limit, offset, principal())
    return jsonify({"jobs": [job_record(view) for view in views], "limit": limit, "offset": offset})


@bp.delete("/jobs/<job_id>", provide_automatic_options=False)
def cancel_job(job_id: str) -> Response:
    """Cancel a pending or running job, or delete an ended one; either way its files are deleted."""
    return jsonify(job_record(JobView(get_service().cancel(job_id, principal()))))


@bp.get("/queue")
def get_queue() -> Response:
    """How many jobs wait and run, the limits, and the arithmetic each model runs in."""
    return jsonify(dataclasses.asdict(get_service().queue_stats(principal())))
