"""The web page at /, and the security headers every response carries (ARCHITECTURE.md, "The web page")."""

from __future__ import annotations

from flask import Blueprint, Response, render_template
from whisper.tokenizer import LANGUAGES

from whisper_flask.api.fields import MAX_SPEAKERS
from whisper_flask.engine.options import Task
from whisper_flask.extension import get_service

bp = Blueprint("page", __name__)

#: The page's words for each task; a Task without one fails here, at import.
_TASK_LABELS = {Task.TRANSCRIBE: "Transcribe", Task.TRANSLATE: "Translate to English"}
TASKS = [(task.value, _TASK_LABELS[task]) for task in Task]

#: Scripts and styles come only from this origin's files, so a file name or transcript that slips
#: into the page as markup still cannot run; the page talks only to its own origin.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",  # Swagger UI's icons
        # 'self' also matches the origin's own ws:/wss: (CSP Level 3; Chromium checked in tests/test_page.py),
        # so the recorder's socket to /ws/transcribe needs no source of its own.
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)


@bp.get("/")
def index() -> str:
    """The page: asks for a key, uploads files with live progress, shows transcripts and the key's jobs."""
    languages = sorted((name.title(), code) for code, name in LANGUAGES.items())
    return render_template(
        "index.html",
        languages=languages,
        multilingual=get_service().is_multilingual,
        tasks=TASKS,
        max_upload_mb=get_service().settings.MAX_UPLOAD_MB,
        max_speakers=MAX_SPEAKERS,
    )


@bp.after_app_request
def add_security_headers(response: Response) -> Response:
    """Every response: the CSP, no MIME sniffing, and no Referer (a signed link must not leak through it)."""
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response
