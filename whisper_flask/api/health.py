"""Liveness and readiness for load balancers and systemd."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from whisper_flask.extension import get_service

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """200 while the process serves."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    """200 once the model is loaded; 503 model_loading while it loads, model_unavailable if it failed."""
    get_service().check_ready()
    return jsonify({"status": "ready"})
