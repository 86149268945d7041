"""OpenAI's audio API on the shared queue: /v1/audio/transcriptions, /v1/audio/translations, /v1/models.

Each request is an ordinary job of its key (it shows in /jobs, has progress, is fair to other jobs,
durable and resumable); the response waits for it, or streams its text window by window. A client
that leaves does not cancel the job. Errors under /v1 use OpenAI's envelope (errors.py).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify, request
from werkzeug.datastructures import MultiDict
from whisper.tokenizer import LANGUAGES

from whisper_flask.access.control import Principal
from whisper_flask.api.auth import principal, require_key
from whisper_flask.api.errors import OPENAI_PREFIX, ApiError, openai_error
from whisper_flask.api.fields import parse_flag, parse_options
from whisper_flask.api.speakers import diarized, diarized_segments, known_speakers
from whisper_flask.api.uploads import client_filename, keep_upload, receive_upload
from whisper_flask.engine.options import Task, TranscribeOptions
from whisper_flask.exceptions import JobFailed, NoTranscript, ServiceError
from whisper_flask.extension import get_service
from whisper_flask.jobs.records import Job, JobStatus, Submission
from whisper_flask.jobs.writers import FORMATS
from whisper_flask.service.face import DIARIZE_SUFFIX, TranscriptionService

bp = Blueprint("openai", __name__, url_prefix=OPENAI_PREFIX)
require_key(bp)

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt", "diarized_json")
GRANULARITIES = ("segment", "word")
#: The option fields (api/fields.py) that OpenAI's form shares with /upload; describe.py documents them.
OPTION_FIELDS = ("language", "prompt", "temperature", "chunking_strategy")
#: OpenAI's segment fields, in its order; Whisper's segments carry them all.
SEGMENT_FIELDS = ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                  "compression_ratio", "no_speech_prob")  # fmt: skip
#: How often a streaming response looks for newly finished windows.
STREAM_POLL_S = 0.5
#: A comment line this often keeps proxies from timing out and finds clients that have left.
KEEPALIVE_S = 10.0


@bp.get("/models")
def list_models() -> Response:
    """The models a request may name, in OpenAI's list shape."""
    return jsonify({"object": "list", "data": [_model(name) for name in get_service().model_names()]})


@bp.get("/models/<path:model_id>")
def get_model(model_id: str) -> Response:
    """One model in OpenAI's shape; 404 model_not_found for a model this service does not serve."""
    get_service().resolve_model(model_id)
    return jsonify(_model(model_id))


@bp.post("/audio/transcriptions")
def create_transcription() -> Response:
    """Transcribe an uploaded file as OpenAI's API does, on the shared queue."""
    return _answer(Task.TRANSCRIBE)


@bp.post("/audio/translations")
def create_translation() -> Response:
    """Translate an uploaded file's speech into English text as OpenAI's API does, on the shared queue."""
    return _answer(Task.TRANSLATE)


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "whisper_flask"}


def _answer(task: Task) -> Response:
    service = get_service()
    who = principal()
    service.check_capacity(who)  # before the body is read, as on /upload
    # The slot only once the body is here: a slow sender must not hold a place it is not waiting in.
    file = receive_upload()
    give_back = service.hold_wait_slot()  # each request holds an HTTP thread until its job ends
    try:
        form = request.form
        model = form.get("model") or _missing("model")
        service.resolve_model(model)
        fmt = _one_of(form, "response_format", RESPONSE_FORMATS, "json")
        diarize = fmt == "diarized_json" or model.endswith(DIARIZE_SUFFIX)
        granularities = [_checked("timestamp_granularities[]", value, GRANULARITIES) for value in _granularities(form)]
        if "word" in granularities and fmt != "verbose_json":
            raise ApiError(400, "invalid_value", "timestamp_granularities[] needs response_format verbose_json",
                           field="timestamp_granularities[]")  # fmt: skip
        stream = parse_flag("stream", form.get("stream") or "false")
        if stream and fmt not in ("json", "text", "diarized_json"):
            raise ApiError(400, "invalid_value", "stream=true sends text events; use response_format json, text"
                           " or diarized_json", field="stream")  # fmt: skip
        names, samples = known_speakers(form, diarize)
        options = _options(form, task, "word" in granularities, service.is_multilingual, diarize, names)
        submission = Submission(client_filename(file.filename), options, who.name, request.remote_addr)
        job = service.submit(keep_upload(file), submission, samples).job
        if stream:
            response = Response(_events(service, job.id, who, diarize), mimetype="text/event-stream")
            # nginx passes each event on at once instead of buffering the response.
            response.headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        else:
            response = _final(service, service.wait(job.id, who), fmt, granularities)
        response.headers["X-Job-Id"] = job.id  # a client that gives up can still fetch the job
    except BaseException:
        give_back()
        raise
    response.call_on_close(give_back)
    return response


def _missing(field: str) -> str:
    raise ApiError(400, "missing_parameter", f"you must provide a '{field}' parameter", field=field)


def _checked(field: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ApiError(400, "invalid_value", f"{field} must be one of {', '.join(allowed)}", field=field)
    return value


def _one_of(form: MultiDict[str, str], field: str, allowed: tuple[str, ...], default: str) -> str:
    return _checked(field, form.get(field) or default, allowed)


def _granularities(form: MultiDict[str, str]) -> list[str]:
    # OpenAI's clients send the list as repeated `timestamp_granularities[]` parts.
    return form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")


def _options(
    form: MultiDict[str, str], task: Task, words: bool, multilingual: bool, diarize: bool, names: list[str]
) -> TranscribeOptions:
    # An object field comes as bracketed parts (chunking_strategy[type]), which parse_options joins.
    fields = {name: value for name, value in form.items() if name.split("[")[0] in OPTION_FIELDS}
    fields["task"] = task.value
    if words:
        fields["word_timestamps"] = "true"
    if diarize:
        fields["diarize"] = "true"
    options = parse_options([fields], multilingual)
    return dataclasses.replace(options, known_speakers=tuple(names)) if names else options


def _final(service: TranscriptionService, job: Job, fmt: str, granularities: list[str]) -> Response:
    _raise_unless_completed(job)
    if fmt in ("srt", "vtt"):
        _, path = service.transcript(job.id, fmt, principal())
        return Response(path.read_text(encoding="utf-8"), mimetype=FORMATS[fmt])
    result = service.result(job.id, principal())
    text = result["text"].strip()
    if fmt == "text":
        return Response(text + "\n", mimetype="text/plain")
    if fmt == "json":
        return jsonify({"text": text})
    if fmt == "diarized_json":
        return jsonify(diarized(job, result, text))
    return jsonify(_verbose(job, result, text, granularities))


def _verbose(job: Job, result: dict[str, Any], text: str, granularities: list[str]) -> dict[str, Any]:
    language = result.get("language") or job.language or ""
    body: dict[str, Any] = {
        "task": (job.options.task or Task.TRANSCRIBE).value,
        "language": LANGUAGES.get(language, language),  # OpenAI names the language: "english"
        "duration": job.duration,
        "text": text,
    }
    segments = result["segments"]
    if "segment" in granularities or not granularities:
        body["segments"] = [{field: segment[field] for field in SEGMENT_FIELDS} for segment in segments]
    if "word" in granularities:
        body["words"] = [
            {"word": word["word"].strip(), "start": word["start"], "end": word["end"]}
            for segment in segments
            for word in segment.get("words", [])
        ]
    return body


def _raise_unless_completed(job: Job) -> None:
    if job.status is JobStatus.FAILED:
        raise JobFailed(job.error_code or "transcription_failed", job.error or "the transcription failed")
    if job.status is not JobStatus.COMPLETED:
        raise NoTranscript(f"the job was {job.status.value}; it has no transcript", job.status.value)


def _events(service: TranscriptionService, job_id: str, who: Principal, diarize: bool) -> Iterator[str]:
    """Server-sent events: a delta per finished segment as its window ends, then the whole text.

    A diarized job's speakers are known once it ends: its segments, each with its speaker, come then.
    """
    sent, sent_text = 0, ""
    read_at = 0.0  # the job's progress when its segments were last read
    last_sent = time.monotonic()
    try:
        job = service.wait(job_id, who, STREAM_POLL_S)
        while not job.status.terminal:
            # The resume state holds every finished segment: read it only when a window has ended.
            if job.processed_seconds > read_at:
                read_at = job.processed_seconds
                for segment in service.segments_so_far(job_id, who)[sent:]:
                    sent += 1
                    sent_text += segment["text"]
                    last_sent = time.monotonic()
                    yield _event({"type": "transcript.text.delta", "delta": segment["text"]})
            if time.monotonic() - last_sent >= KEEPALIVE_S:
                last_sent = time.monotonic()
                yield ": keep-alive\n\n"
            job = service.wait(job_id, who, STREAM_POLL_S)
        _raise_unless_completed(job)
        result = service.result(job_id, who)
        if diarize:  # its segments were cut where the speaker changes: the rest of the text, then the segments
            rest = "".join(segment["text"] for segment in result["segments"])[len(sent_text) :]
            if rest:
                yield _event({"type": "transcript.text.delta", "delta": rest})
            yield from (_event(segment) for segment in diarized_segments(result))
        else:
            for segment in result["segments"][sent:]:
                yield _event({"type": "transcript.text.delta", "delta": segment["text"]})
        yield _event({"type": "transcript.text.done", "text": result["text"].strip()})
    except ServiceError as error:  # the status line is sent: the failure becomes an error event
        yield _event(openai_error(error))


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
