"""The one JSON error contract: {"error": message, "code": machine_code} with the right status."""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

# Codes for werkzeug's own errors; the rest are derived from the exception's name.
_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    500: "internal_error",
}


class ApiError(Exception):
    """An error the API answers on purpose; raised from views and services."""

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
    """Build the JSON error body every endpoint uses."""
    response = jsonify({"error": message, "code": code, **extra})
    response.status_code = http_status
    response.headers.update(headers or {})
    return response


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
    """Answer every error, werkzeug's included, in the JSON contract."""
    app.register_error_handler(ApiError, _handle_api_error)
    app.register_error_handler(HTTPException, _handle_http_exception)
