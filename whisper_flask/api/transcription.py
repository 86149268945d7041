"""Upload audio, follow its progress, download the transcript; detect a language."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, jsonify, request, send_file, url_for

from whisper_flask.api import download_url, progress_body
from whisper_flask.api.auth import principal, require_key
from whisper_flask.api.fields import parse_options
from whisper_flask.api.uploads import RAW_BODY_TYPES, client_filename, keep_upload, receive_upload, requested_url
from whisper_flask.audio.fetch import check_url, url_filename
from whisper_flask.extension import get_service
from whisper_flask.jobs.records import Submission
from whisper_flask.jobs.serialize import DOWNLOAD_RULE
from whisper_flask.jobs.writers import FORMATS
from whisper_flask.notify.targets import parse_targets

bp = Blueprint("transcription", __name__)
require_key(bp)


@bp.post("/upload", provide_automatic_options=False)  # describe.py answers OPTIONS
def upload_audio() -> tuple[Response, int, dict[str, str]]:
    """Accept an audio file, or a URL to fetch it from, and queue it; 202 with the job's id before any audio work."""
    service = get_service()
    service.check_capacity(principal())  # before the body is read: a full queue should not cost an upload
    source = requested_url()
    file = receive_upload() if source is None else None
    fields = [request.form if source is None else source[1], request.args]
    options = parse_options(fields, service.is_multilingual)
    # From the body where it can carry them: a token in a query string would land in access logs. Their links
    # start with PUBLIC_URL only, never with this request's Host, which the client chooses.
    raw_body = request.mimetype.startswith(RAW_BODY_TYPES)
    notify = parse_targets(fields[1:] if raw_body else fields[:1], service.settings.PUBLIC_URL, service.sends_email)
    if file is not None:
        submission = Submission(client_filename(file.filename), options, principal().name, request.remote_addr, notify)
        view = service.submit(keep_upload(file), submission)
    else:
        assert source is not None
        name = client_filename(url_filename(check_url(source[0])))
        view = service.submit_url(source[0], Submission(name, options, principal().name, request.remote_addr, notify))
    job_id = view.job.id
    body = progress_body(view)
    body["download_url"] = download_url(job_id, "txt")
    body["progress_url"] = url_for(".get_progress", job_id=job_id)
    return jsonify(body), 202, {"Location": url_for("jobs.get_job", job_id=job_id)}


@bp.get("/progress/<job_id>")
def get_progress(job_id: str) -> Response:
    """A job's status and real progress."""
    return jsonify(progress_body(get_service().view(job_id, principal())))


@bp.get(DOWNLOAD_RULE)  # the links jobs/serialize.transcript_link builds
def download_transcript(job_id: str, fmt: str) -> Response:
    """The transcript file in one format, as an attachment named after the upload; by key or by signed link."""
    service = get_service()
    if "signature" in request.args:
        expires, signature = request.args.get("expires", ""), request.args["signature"]
        job, path = service.transcript_by_link(job_id, fmt, expires, signature)
    else:
        job, path = service.transcript(job_id, fmt, principal())
    stem = Path(client_filename(job.filename)).stem or "transcript"  # also records stored before names were cleaned
    return send_file(path, mimetype=FORMATS[fmt], as_attachment=True, download_name=f"{stem}.{fmt}")


@bp.post("/detect-language")
def detect_language() -> Response:
    """The spoken language of the first 30 seconds of an uploaded file, answered at once."""
    file = receive_upload()
    probs = get_service().detect_language(keep_upload(file))
    top = sorted(probs.items(), key=lambda item: item[1], reverse=True)[:5]
    return jsonify(
        {
            "language": top[0][0],
            "probability": round(top[0][1], 4),
            "top": [{"language": code, "probability": round(p, 4)} for code, p in top],
        }
    )
