"""The one JSON error contract: {"error": message, "code": machine_code} with the right status.

Under /v1 (OpenAI's API) the same errors take OpenAI's envelope instead:
{"error": {"message", "type", "param", "code"}}, so OpenAI's clients raise the right exception.
Services raise their own exceptions (exceptions.py); this module alone turns them into HTTP.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, has_request_context, jsonify, request
from werkzeug.exceptions import HTTPException

from whisper_flask.exceptions import (
    ApiKeyError,
    AudioDecodeError,
    AudioTooLong,
    BrokerUnavailable,
    DatabaseUnavailable,
    InvalidOption,
    JobExpired,
    JobFailed,
    JobNotFound,
    LinkRefused,
    ModelLoading,
    ModelNotFound,
    ModelUnavailable,
    NotMultilingual,
    NoTranscript,
    QueueFull,
    ServiceError,
    ShuttingDown,
    StorageFull,
    TooManyFailures,
    TooManyJobs,
    TooManyNotifications,
    TranscriptMissing,
    TranscriptNotReady,
    Unauthenticated,
    UnknownFormat,
)

#: The HTTP status of each service exception (a subclass not listed takes its base's).
_STATUS: dict[type[ServiceError], int] = {
    InvalidOption: 400,
    AudioDecodeError: 400,
    AudioTooLong: 400,
    ApiKeyError: 400,
    Unauthenticated: 401,
    LinkRefused: 403,
    JobNotFound: 404,
    ModelNotFound: 404,
    UnknownFormat: 404,
    TranscriptMissing: 404,
    TranscriptNotReady: 409,
    NoTranscript: 409,
    JobExpired: 410,
    NotMultilingual: 422,
    TooManyFailures: 429,
    TooManyJobs: 429,
    TooManyNotifications: 429,
    QueueFull: 503,
    ShuttingDown: 503,
    ModelLoading: 503,
    ModelUnavailable: 503,
    DatabaseUnavailable: 503,
    BrokerUnavailable: 503,
    StorageFull: 507,
}

#: The path prefix of OpenAI's API, whose errors use OpenAI's envelope.
OPENAI_PREFIX = "/v1"

# Codes for werkzeug's own errors; the rest are derived from the exception's name.
_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    500: "internal_error",
}


class ApiError(Exception):
    """An error a view answers on purpose about the request itself (a bad query, a missing file part)."""

    def __init__(
        self,
        http_status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra


def error_response(
    http_status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    """Build the JSON error body every endpoint uses (OpenAI's envelope under /v1)."""
    if has_request_context() and f"{request.path}/".startswith(f"{OPENAI_PREFIX}/"):
        response = jsonify(_openai_body(http_status, code, message, extra.get("field")))
    else:
        response = jsonify({"error": message, "code": code, **extra})
    response.status_code = http_status
    response.headers.update(headers or {})
    return response


def openai_error(error: ServiceError) -> dict[str, Any]:
    """A service error in OpenAI's envelope, for a stream whose status line was already sent."""
    return _openai_body(_status(error), error.code, str(error), _details(error).get("field"))


def _openai_body(http_status: int, code: str, message: str, param: str | None) -> dict[str, Any]:
    kind = "server_error" if http_status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _status(error: ServiceError) -> int:
    kind = type(error)
    if isinstance(error, JobFailed):  # answered as the exception that failed the job would be
        kind = next((cls for cls in _service_errors(ServiceError) if cls.code == error.code), JobFailed)
    return next((_STATUS[cls] for cls in kind.__mro__ if cls in _STATUS), 500)


def _service_errors(base: type[ServiceError]) -> list[type[ServiceError]]:
    return [base] + [cls for sub in base.__subclasses__() for cls in _service_errors(sub)]


def _headers(error: ServiceError) -> dict[str, str]:
    if isinstance(error, QueueFull | TooManyJobs | TooManyFailures | TooManyNotifications):
        return {"Retry-After": str(error.retry_after)}
    if isinstance(error, Unauthenticated):
        return {"WWW-Authenticate": 'Bearer realm="whisper_flask"'}
    if isinstance(error, ShuttingDown):
        return {"Retry-After": "30"}
    if isinstance(error, ModelLoading | DatabaseUnavailable | BrokerUnavailable):
        return {"Retry-After": "5"}
    return {}


def _details(error: ServiceError) -> dict[str, Any]:
    if isinstance(error, InvalidOption):
        return {"field": error.field}
    if isinstance(error, ModelNotFound):
        return {"field": "model"}
    if isinstance(error, TranscriptNotReady):
        return {"status": error.status, "progress": error.progress}
    if isinstance(error, NoTranscript):
        return {"status": error.status}
    return {}


def _handle_service_error(error: ServiceError) -> Response:
    return error_response(_status(error), error.code, str(error), _headers(error), **_details(error))


def _handle_api_error(error: ApiError) -> Response:
    return error_response(error.http_status, error.code, error.message, error.headers, **error.extra)


def _handle_http_exception(error: HTTPException) -> Response:
    # Unhandled exceptions reach here as InternalServerError after Flask has logged
    # them, so this changes only the body's shape and hides nothing.
    status = error.code or 500
    code = _HTTP_CODES.get(status) or (error.name or "error").lower().replace(" ", "_")
    headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}
    return error_response(status, code, error.description or error.name, headers)


def register_error_handlers(app: Flask) -> None:
    """Answer every error, werkzeug's and the service's included, in the JSON contract."""
    app.register_error_handler(ServiceError, _handle_service_error)
    app.register_error_handler(ApiError, _handle_api_error)
    app.register_error_handler(HTTPException, _handle_http_exception)
