"""The one accessor of the app's service, for views and CLI commands (ARCHITECTURE.md, "Rooms")."""

from __future__ import annotations

from flask import Flask, current_app

from whisper_flask.service.face import EXTENSION, TranscriptionService


def get_service(app: Flask | None = None) -> TranscriptionService:
    """The service of `app`, or of the current app."""
    service: TranscriptionService = (app or current_app).extensions[EXTENSION]
    return service
