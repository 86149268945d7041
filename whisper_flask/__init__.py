"""whisper_flask: a self-hosted speech-to-text service on one shared Whisper model."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

if TYPE_CHECKING:
    from whisper_flask.engine.engine import Engine


def create_app(test_config: Mapping[str, Any] | None = None, *, engine: Engine | None = None) -> Flask:
    """Build the app: WHISPER_FLASK_* variables, then test_config, over the defaults; validated into Settings.

    `engine` replaces the Whisper engine (tests pass a fake). Nothing runs yet: the service starts
    with the server (deploy/gunicorn.conf.py) or at the first request.
    """
    from whisper_flask.api import describe, health, jobs, live, openai_audio, page, realtime, transcription
    from whisper_flask.api.body import BodyGuard
    from whisper_flask.api.errors import register_error_handlers
    from whisper_flask.api.uploads import UploadRequest
    from whisper_flask.audio.subprocesses import media_tool
    from whisper_flask.cli import keys_cli, models_cli
    from whisper_flask.engine.engine import WhisperEngine
    from whisper_flask.engine.internals import check_whisper_internals
    from whisper_flask.logs import configure_logging
    from whisper_flask.service.face import TranscriptionService
    from whisper_flask.settings import Settings

    check_whisper_internals()
    media_tool("ffmpeg"), media_tool("ffprobe")  # refuse to start without them, not at the first upload
    app = Flask(__name__)
    settings = Settings.from_environment(os.environ, test_config or {})
    app.config.from_mapping(test_config or {})  # Flask's own settings (TESTING...) among them
    app.config.update(settings.to_config())  # Flask reads MAX_CONTENT_LENGTH; everything else reads `settings`
    configure_logging(settings.LOG_DIR, app.name)

    app.wsgi_app = BodyGuard(app.wsgi_app, settings.BODY_TIMEOUT_S)  # type: ignore[method-assign]
    if proxies := settings.PROXY_FIX:
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=proxies, x_proto=proxies, x_host=proxies, x_prefix=proxies
        )
    app.request_class = UploadRequest
    app.json.sort_keys = False  # type: ignore[attr-defined]
    register_error_handlers(app)
    for module in (transcription, jobs, health, openai_audio, live, realtime, page, describe):
        app.register_blueprint(module.bp)
    app.cli.add_command(models_cli)
    app.cli.add_command(keys_cli)

    TranscriptionService().init_app(app, settings, engine or WhisperEngine())
    return app
