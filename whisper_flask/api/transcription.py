"""Upload audio, follow its progress, download the transcript; detect a language."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, current_app, jsonify, request, send_file, url_for

from ..audio import AudioDecodeError, decode_audio
from ..engine import ModelUnavailable
from ..errors import ApiError
from ..formats import FORMATS, transcript_path
from ..jobs import get_service
from ..options import parse_options
from ..records import JobStatus
from ..uploads import client_filename, keep_upload, receive_upload
from . import find_job, progress_body

bp = Blueprint("transcription", __name__)


@bp.post("/upload")
def upload_audio() -> tuple[Response, int, dict[str, str]]:
    """Accept an audio file and queue it; 202 with the job's id before any audio work."""
    service = get_service()
    service.check_capacity()  # before the body is read: a full queue should not cost an upload
    file = receive_upload()
    options = parse_options([request.form, request.args], service.engine.is_multilingual)
    upload_name = keep_upload(file)
    try:
        job = service.create_job(upload_name, client_filename(file), options, request.remote_addr)
    except BaseException:
        (current_app.config["UPLOAD_DIR"] / upload_name).unlink(missing_ok=True)
        raise
    body = progress_body(job)
    body["download_url"] = url_for(".download_transcript", job_id=job.id, fmt="txt")
    body["progress_url"] = url_for(".get_progress", job_id=job.id)
    return jsonify(body), 202, {"Location": url_for("jobs.get_job", job_id=job.id)}


@bp.get("/progress/<job_id>")
def get_progress(job_id: str) -> Response:
    """A job's status and real progress."""
    return jsonify(progress_body(find_job(job_id)))


@bp.get("/download/<job_id>.<fmt>")
def download_transcript(job_id: str, fmt: str) -> Response:
    """The transcript file in one format, as an attachment named after the upload."""
    job = find_job(job_id)
    if fmt not in FORMATS:
        raise ApiError(404, "unknown_format", f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if job.status in (JobStatus.PENDING, JobStatus.IN_PROGRESS):
        raise ApiError(
            409, "not_ready", "the transcript is not ready yet", status=job.status.value, progress=job.progress
        )
    if job.status is not JobStatus.COMPLETED:
        raise ApiError(
            409, "no_transcript", f"the job is {job.status.value}; it has no transcript", status=job.status.value
        )
    # The path is built from the registry's id and a whitelisted format, never from the URL text.
    path = transcript_path(get_service().transcript_dir, job.id, fmt)
    if not path.is_file():
        raise ApiError(404, "transcript_not_found", "the transcript file is gone")
    stem = Path(job.filename).stem or "transcript"
    return send_file(path, mimetype=FORMATS[fmt], as_attachment=True, download_name=f"{stem}.{fmt}")


@bp.post("/detect-language")
def detect_language() -> Response:
    """The spoken language of the first 30 seconds of an uploaded file, answered at once."""
    engine = get_service().engine
    file = receive_upload()
    if not engine.is_multilingual:
        raise ApiError(422, "model_not_multilingual", f"the loaded model {engine.model_name} is English-only")
    try:
        audio = decode_audio(Path(file.stream.name), max_seconds=30)
        probs = engine.detect_language(audio)
    except AudioDecodeError as exc:
        raise ApiError(400, "invalid_audio", str(exc)) from None
    except ModelUnavailable as exc:
        raise ApiError(503, "model_not_ready", str(exc), {"Retry-After": "10"}) from None
    top = sorted(probs.items(), key=lambda item: item[1], reverse=True)[:5]
    return jsonify(
        {
            "language": top[0][0],
            "probability": round(top[0][1], 4),
            "top": [{"language": code, "probability": round(p, 4)} for code, p in top],
        }
    )
