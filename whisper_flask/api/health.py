"""Liveness and readiness for load balancers and systemd."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from ..errors import error_response
from ..jobs import get_service

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """200 while the process serves."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    """200 once the model is loaded; 503 while loading or if it failed."""
    engine = get_service().engine
    if engine.ready:
        return jsonify({"status": "ready", "model": engine.model_name})
    if engine.error:
        return error_response(503, "model_unavailable", engine.error)
    return error_response(503, "model_loading", f"model {engine.model_name} is loading", {"Retry-After": "5"})
