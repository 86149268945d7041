"""whisper_flask: a self-hosted speech-to-text service on one shared Whisper model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from . import config as defaults


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: defaults, then WHISPER_FLASK_* variables, then test_config; validated."""
    from .api import health, jobs, transcription
    from .cli import models_cli
    from .engine import WhisperEngine
    from .errors import register_error_handlers
    from .jobs import JobService
    from .logs import configure_logging
    from .uploads import UploadRequest

    app = Flask(__name__)
    app.config.from_mapping(defaults.DEFAULTS)
    app.config.from_prefixed_env("WHISPER_FLASK")
    # Tests may pass "ENGINE": a ready-made engine object (a fake) instead of Whisper.
    engine = dict(test_config or {}).pop("ENGINE", None) or WhisperEngine()
    app.config.from_mapping({k: v for k, v in (test_config or {}).items() if k != "ENGINE"})
    defaults.validate_config(app.config)
    configure_logging(app.config["LOG_DIR"], app.name)

    if proxies := app.config["PROXY_FIX"]:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=proxies, x_host=proxies)  # type: ignore[method-assign]
    app.request_class = UploadRequest
    app.json.sort_keys = False  # type: ignore[attr-defined]
    register_error_handlers(app)
    for module in (transcription, jobs, health):
        app.register_blueprint(module.bp)
    app.cli.add_command(models_cli)

    JobService().init_app(app, engine)
    return app
