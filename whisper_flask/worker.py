"""A cluster's worker node: `celery -A whisper_flask.worker worker` (ARCHITECTURE.md, "Cluster").

Celery finds `app` here. Nothing is configured at import: Celery reads the settings from the
WHISPER_FLASK_* environment when it configures the app, and the service (one model, its model
thread, MAX_WORKERS job threads, the heartbeat and the reconciler) is built and started when the
worker starts, and stopped with it.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from celery import Celery, signals

from whisper_flask.jobs.celery_queue import TASK, celery_config
from whisper_flask.service.face import TranscriptionService
from whisper_flask.settings import PREFIX, ConfigError, Settings

app = Celery("whisper_flask")
_service = TranscriptionService()


@functools.cache
def _settings() -> Settings:
    settings = Settings.from_environment(os.environ, {})
    if not settings.BROKER_URL:
        raise ConfigError(f"a worker needs {PREFIX}BROKER_URL and {PREFIX}DATABASE_URL: the broker and the database")
    return settings


def _configure(sender: Celery, **_: Any) -> None:
    sender.conf.update(celery_config(_settings()))


def _start(**_: Any) -> None:
    from whisper_flask.audio.subprocesses import media_tool
    from whisper_flask.engine.engine import WhisperEngine
    from whisper_flask.engine.internals import check_whisper_internals
    from whisper_flask.logs import configure_logging
    from whisper_flask.service.compose import Role

    settings = _settings()
    check_whisper_internals()
    media_tool("ffmpeg"), media_tool("ffprobe")  # refuse to start without them, not at the first job
    configure_logging(settings.LOG_DIR, "whisper_flask")
    _service.build(settings, WhisperEngine(), Role.WORKER)
    _service.start()


def _stop_jobs(**_: Any) -> None:
    # A warm shutdown waits for running tasks: stopping the jobs first (back to pending, resumable)
    # makes it take one decoder step, not the rest of a long recording.
    _service.stop_jobs()


def _stop(**_: Any) -> None:
    _service.stop()


def _run_ticket(ticket: str) -> None:
    """Run the pending job whose turn it is on this worker (the ticket names the job that asked)."""
    _service.run_ticket(ticket)


# Connected by calls, not decorators: Celery is untyped, and its decorators would untype these functions.
app.on_configure.connect(_configure)
signals.worker_init.connect(_start)
signals.worker_shutting_down.connect(_stop_jobs)
signals.worker_shutdown.connect(_stop)
run_ticket = app.task(name=TASK)(_run_ticket)
