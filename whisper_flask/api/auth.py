"""API keys on every API route: read from the request's headers before its body is read."""

from __future__ import annotations

from flask import Blueprint, g, request

from whisper_flask.access.control import Principal
from whisper_flask.extension import get_service

#: The route a signed link opens without a key (its view checks the signature instead).
SIGNED_ENDPOINT = "transcription.download_transcript"


def presented_key() -> str | None:
    """The key in `Authorization: Bearer <key>`, else in `X-API-Key` (for tools that cannot set Authorization)."""
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.headers.get("X-API-Key") or None


def _authenticate() -> None:
    if request.endpoint == SIGNED_ENDPOINT and "signature" in request.args:
        return
    g.principal = get_service().authenticate(presented_key(), request.remote_addr or "")


def require_key(bp: Blueprint) -> None:
    """Authenticate every request to `bp` before its view runs (and so before an upload is read)."""
    bp.before_request(_authenticate)


def principal() -> Principal:
    """Who the current request acts for."""
    who: Principal = g.principal
    return who
