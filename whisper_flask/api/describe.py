"""What the API accepts: OPTIONS on the job routes, an OpenAPI 3.1 description, and its documentation page.

The description is built from the code it describes (option fields, formats, statuses, languages),
and a test checks that its paths and methods are exactly the app's routes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flask_swagger_ui
from flask import Blueprint, Response, current_app, jsonify, render_template, request, send_from_directory
from whisper.tokenizer import LANGUAGES

from whisper_flask.api.fields import FIELDS
from whisper_flask.api.jobs import PAGING
from whisper_flask.api.openai_audio import GRANULARITIES, OPTION_FIELDS, RESPONSE_FORMATS
from whisper_flask.api.speakers import SPEAKER_FIELDS
from whisper_flask.api.uploads import RAW_BODY_TYPES
from whisper_flask.audio.stream_decode import LiveAudioFormat
from whisper_flask.extension import get_service
from whisper_flask.jobs.records import JobStage, JobStatus
from whisper_flask.jobs.serialize import DOWNLOAD_PATH
from whisper_flask.jobs.writers import FORMATS
from whisper_flask.notify.messages import SIGNATURE_HEADER
from whisper_flask.notify.targets import TARGET_FIELDS

bp = Blueprint("describe", __name__)

#: Swagger UI's files as its pinned package ships them (Apache-2.0): served from here, never a CDN.
SWAGGER_UI = Path(flask_swagger_ui.__file__).parent / "dist"
#: The raw-body types uploads.py accepts, as media ranges ("audio/" -> "audio/*").
RAW_TYPES = tuple(f"{kind}*" if kind.endswith("/") else kind for kind in RAW_BODY_TYPES)
FILE = {"type": "string", "contentMediaType": "application/octet-stream"}
_NOTIFY_HELP = {
    "callback_url": f"gets a JSON POST signed in {SIGNATURE_HEADER} at the end",
    "email": "sent the links when the job ends (needs SMTP_HOST)",
}
#: A field the notifier parses but nobody described fails here, at import.
NOTIFY_FIELDS = {name: {"type": "string", "description": _NOTIFY_HELP[name]} for name in TARGET_FIELDS}
STATUS = {"type": "string", "enum": [status.value for status in JobStatus]}
#: Where an app keeps the OpenAPI documents it has built.
OPENAPI_EXTENSION = "whisper_flask.openapi"


def _option_fields() -> dict[str, Any]:
    """Each option field's schema, with the values the loaded model takes."""
    multilingual = get_service().is_multilingual
    fields = {name: dict(field.schema) for name, field in FIELDS.items()}
    fields["language"]["enum"] = sorted(LANGUAGES) if multilingual else ["en"]
    fields["task"]["enum"] = fields["task"]["enum"] if multilingual else ["transcribe"]
    return fields


def _jobs_query() -> dict[str, Any]:
    """The job list's query parameters, from the declarations api/jobs.py parses them with."""
    return {"status": STATUS, **{name: query.schema for name, query in PAGING.items()}}


@bp.route("/upload", methods=["OPTIONS"])
def describe_upload() -> Response:
    """The upload's methods, body types and fields, with the values each field takes."""
    return jsonify(
        {
            "methods": ["POST"],
            "content_types": ["multipart/form-data", "application/json", *RAW_TYPES],
            "fields": {"file": {"type": "file"}, "url": {"type": "string"}, **_option_fields(), **NOTIFY_FIELDS},
            "formats": list(FORMATS),
        }
    )


@bp.route("/jobs", methods=["OPTIONS"])
def describe_jobs() -> Response:
    """The job list's query parameters and their values."""
    return jsonify({"methods": ["GET"], "query": _jobs_query()})


@bp.route("/jobs/<job_id>", methods=["OPTIONS"])
def describe_job(job_id: str) -> Response:
    """What may be done to one job."""
    return jsonify({"methods": ["GET", "DELETE"], "formats": list(FORMATS)})


@bp.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3.1 description of this API, built once per app (and per answer to is_multilingual)."""
    # In app.extensions, not a module global: each app describes its own model. The model's name
    # guesses is_multilingual until the model is loaded, so the answer is part of the key.
    built: dict[bool, dict[str, Any]] = current_app.extensions.setdefault(OPENAPI_EXTENSION, {})
    multilingual = get_service().is_multilingual
    if multilingual not in built:
        built[multilingual] = openapi_document()  # two threads may both build it: the same document
    # Only the server differs between requests (a sub-path's prefix).
    return jsonify({**built[multilingual], "servers": [{"url": request.script_root or "/"}]})


@bp.get("/docs")
def docs() -> str:
    """The API's documentation page (Swagger UI, served from this server)."""
    return render_template("docs.html")


@bp.get("/docs/vendor/<path:name>")
def docs_asset(name: str) -> Response:
    """Swagger UI's own files; send_from_directory refuses any path outside its folder."""
    return send_from_directory(SWAGGER_UI, name)


# -- the document ------------------------------------------------------------------------------


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ok(description: str, content: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, **({"content": content} if content else {})}


def _errors(*statuses: int, openai: bool = False) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{'OpenAIError' if openai else 'Error'}"}
    return {str(status): _ok("an error, in plain words", _json(schema)) for status in statuses}


def _path(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}, "description": description}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _operation(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": responses, **extra}


def openapi_document() -> dict[str, Any]:
    """The description of every route; its `servers` entry is added per request (a sub-path's prefix)."""
    options = _option_fields()
    job = {"$ref": "#/components/schemas/Job"}
    job_id = _path("job_id", "the id the upload answered with")
    upload_form = {
        "type": "object",
        "properties": {"file": FILE, "url": {"type": "string"}, **options, **NOTIFY_FIELDS},
    }
    url_properties = {"url": {"type": "string"}, **options, **NOTIFY_FIELDS}
    url_body = {"type": "object", "required": ["url"], "properties": url_properties}
    raw_body = {"schema": FILE}
    upload_query = [_query("filename", {"type": "string"}), *(_query(name, schema) for name, schema in options.items())]
    openai_form = {
        "type": "object",
        "required": ["file", "model"],
        "properties": {
            "file": FILE,
            "model": {"type": "string", "examples": ["whisper-1"]},
            **{name: options[name] for name in OPTION_FIELDS},
            "response_format": {"type": "string", "enum": list(RESPONSE_FORMATS)},
            "timestamp_granularities[]": {"type": "array", "items": {"type": "string", "enum": list(GRANULARITIES)}},
            "stream": {"type": "boolean"},
            **SPEAKER_FIELDS,
        },
    }
    openai_audio = _operation(
        "OpenAI's audio API on the same jobs",
        {"200": _ok("the transcript in the asked format"), **_errors(400, 401, 404, 413, 429, 500, 503, openai=True)},
        requestBody={"required": True, "content": {"multipart/form-data": {"schema": openai_form}}},
    )
    described = {"200": _ok("the accepted methods and values", _json({"type": "object"}))}
    paths: dict[str, Any] = {
        "/upload": {
            "post": _operation(
                "Queue audio (a file part, a raw body, or a URL to fetch); 202 at once",
                {"202": _ok("the new job", _json(job)), **_errors(400, 401, 413, 429, 503, 507)},
                parameters=upload_query,
                requestBody={
                    "required": True,
                    "content": {
                        "multipart/form-data": {"schema": upload_form},
                        "application/json": {"schema": url_body},
                        **{t: raw_body for t in RAW_TYPES},
                    },
                },
            ),
            "options": _operation("The upload's fields and their values", described, security=[]),
        },
        "/progress/{job_id}": {
            "get": _operation(
                "A job's status and progress",
                {"200": _ok("the job", _json(job)), **_errors(401, 404, 410)},
                parameters=[job_id],
            )
        },
        DOWNLOAD_PATH: {
            "get": _operation(
                "The transcript, by key or by the signed link from a response",
                {"200": _ok("the transcript file"), **_errors(401, 403, 404, 409, 410)},
                parameters=[
                    job_id,
                    {**_path("fmt", "the format"), "schema": {"type": "string", "enum": list(FORMATS)}},
                    _query("expires", {"type": "string"}),
                    _query("signature", {"type": "string"}),
                ],
            )
        },
        "/jobs": {
            "get": _operation(
                "The key's jobs, newest first (an admin key's: everyone's)",
                {"200": _ok("a page of jobs", _json({"type": "object"})), **_errors(400, 401)},
                parameters=[_query(name, schema) for name, schema in _jobs_query().items()],
            ),
            "options": _operation("The job list's query parameters", described, security=[]),
        },
        "/jobs/{job_id}": {
            "get": _operation(
                "A job's whole record, with its notifications",
                {"200": _ok("the job", _json(job)), **_errors(401, 404, 410)},
                parameters=[job_id],
            ),
            "delete": _operation(
                "Cancel a job, or delete an ended one",
                {"200": _ok("the job", _json(job)), **_errors(401, 404, 507)},
                description="A pending or running job is cancelled; an ended one is marked expired, so its links"
                " and downloads answer 410. Either way its audio, transcripts and resume state are deleted."
                " Deleting it again returns its record.",
                parameters=[job_id],
            ),
            "options": _operation("What may be done to a job", described, security=[], parameters=[job_id]),
        },
        "/queue": {
            "get": _operation(
                "Jobs, limits, each model's arithmetic, a cluster's workers", {"200": _ok("counts"), **_errors(401)}
            )
        },
        "/detect-language": {
            "post": _operation(
                "The language of the first 30 s of a file",
                {"200": _ok("the top languages"), **_errors(400, 401, 413, 503)},
                requestBody={
                    "required": True,
                    "content": {"multipart/form-data": {"schema": {"type": "object", "properties": {"file": FILE}}}},
                },
            )
        },
        "/webhook-secret": {
            "get": _operation("The secret that signs this key's webhooks", {"200": _ok("the secret"), **_errors(401)})
        },
        "/live/token": {
            "post": _operation(
                "A token that opens live sessions for 60 s: a browser offers it as the subprotocol `token.<token>`",
                {"200": _ok("the token and its lifetime", _json({"type": "object"})), **_errors(401)},
            )
        },
        "/ws/transcribe": {
            "get": _operation(
                "Live transcription over WebSocket: PCM16 or WebM/Opus frames in, partial and final text out (README)",
                {"101": _ok("the WebSocket"), **_errors(400, 401, 503)},
                parameters=[
                    *(_query(name, options[name]) for name in ("language", "task")),
                    _query("save", {"type": "boolean"}),
                    _query(
                        "input_audio_format", {"type": "string", "enum": [audio.value for audio in LiveAudioFormat]}
                    ),
                ],
            )
        },
        "/v1/realtime": {
            "get": _operation(
                "OpenAI's Realtime API over WebSocket, transcription sessions only",
                {"101": _ok("the WebSocket"), **_errors(400, 401, 503, openai=True)},
                parameters=[{**_query("intent", {"type": "string", "enum": ["transcription"]}), "required": True}],
            )
        },
        "/healthz": {"get": _operation("Liveness", {"200": _ok("alive")}, security=[])},
        "/readyz": {
            "get": _operation("Readiness: the model is loaded", {"200": _ok("ready"), **_errors(503)}, security=[])
        },
        "/openapi.json": {"get": _operation("This description", {"200": _ok("OpenAPI 3.1")}, security=[])},
        "/v1/audio/transcriptions": {"post": openai_audio},
        "/v1/audio/translations": {"post": openai_audio},
        "/v1/models": {
            "get": _operation("The models, in OpenAI's shape", {"200": _ok("a list"), **_errors(401, openai=True)})
        },
        "/v1/models/{model_id}": {
            "get": _operation(
                "One model",
                {"200": _ok("the model"), **_errors(401, 404, openai=True)},
                parameters=[_path("model_id", "whisper-1 or the loaded model's name")],
            )
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "whisper_flask", "version": "1", "description": "Self-hosted speech to text (README)."},
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "code"],
                    "properties": {"error": {"type": "string"}, "code": {"type": "string"}},
                },
                "OpenAIError": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object"}}},
                "Job": {
                    "type": "object",
                    "required": ["transcription_id", "status"],
                    "properties": {
                        "transcription_id": {"type": "string"},
                        "status": STATUS,
                        "progress": {"type": "number", "description": "the share of the job's time gone (0 to 100)"},
                        "stage": {"type": "string", "enum": [stage.value for stage in JobStage]},
                        "stage_progress": {"type": ["number", "null"], "description": "the stage's own percentage"},
                        "filename": {"type": "string"},
                        "duration": {"type": ["number", "null"]},
                        "processed_seconds": {"type": "number"},
                        "eta_seconds": {"type": ["number", "null"], "description": "seconds until transcribed"},
                        "language": {"type": ["string", "null"]},
                        "options": {"type": "object"},
                        "created_at": {"type": "string"},
                        "finished_at": {"type": ["string", "null"]},
                        "queue_position": {"type": ["integer", "null"]},
                        "download_url": {"type": "string"},
                        "formats": {"type": "object", "properties": {fmt: {"type": "string"} for fmt in FORMATS}},
                        "error": {"type": ["string", "null"]},
                        "error_code": {"type": ["string", "null"]},
                    },
                },
            },
        },
    }
