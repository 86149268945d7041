"""Gunicorn settings for whisper_flask (`gunicorn -c deploy/gunicorn.conf.py wsgi:app`)."""

from __future__ import annotations

import os
import signal
from typing import Any

bind = os.environ.get("WHISPER_FLASK_BIND", "127.0.0.1:8000")
# Exactly one worker process: the model, the job registry and the job pool live in
# it. A second process would load a second model and run a second pool over the
# same job store.
workers = 1
# Threads serve HTTP (uploads, many polling clients); transcription runs on the
# service's own pool, so these never wait on the model.
worker_class = "gthread"
threads = int(os.environ.get("WHISPER_FLASK_HTTP_THREADS", "16"))
# No preload: torch's thread pools and the job threads do not survive fork().
preload_app = False
# The model loads on a background thread, so boot is quick; this is the heartbeat.
timeout = 120
# SIGTERM: stop taking work, finish the running window, put its job back to pending.
graceful_timeout = int(os.environ.get("WHISPER_FLASK_GRACEFUL_TIMEOUT", "60"))
max_requests = 0  # a restart would interrupt running transcriptions
accesslog = "-"


def post_worker_init(worker: Any) -> None:
    """Start the job service in the worker as it boots: load the model, resume what a stop left."""
    from flask import Flask

    from whisper_flask.extension import get_service

    if isinstance(worker.wsgi, Flask):  # not gunicorn's error app, when wsgi.py failed to load
        worker.wsgi.wsgi_app = close_when_the_app_says(worker.wsgi.wsgi_app)  # type: ignore[method-assign]
        service = get_service(worker.wsgi)
        service.start()
        stop_waiting_on_sigterm(worker, service.drain)


def close_when_the_app_says(app: Any) -> Any:
    """Close the connection after a response whose app said `Connection: close` (gunicorn drops that header).

    The app says so when it answers before reading the whole body (whisper_flask/api/body.py): the
    rest of the body is still on the connection, and gunicorn would otherwise announce keep-alive,
    drain 64 KiB and then close it under a client that sends its next request there.
    """

    def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if any(name.lower() == "connection" and value.lower() == "close" for name, value in headers):
                # gunicorn's start_response is its Response's method; force_close() makes it send
                # `Connection: close` and close the connection after this response.
                getattr(getattr(start_response, "__self__", None), "force_close", lambda: None)()
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return wrapped


def stop_waiting_on_sigterm(worker: Any, drain: Any) -> None:
    """On SIGTERM, answer requests that wait for jobs before gunicorn waits for open connections.

    Otherwise a /v1 request waiting for a long job keeps its connection open through the whole
    graceful_timeout, the arbiter then SIGKILLs the worker before worker_exit puts the jobs back,
    and a graceful stop becomes a crash.
    """
    handle_exit = worker.handle_exit

    def drain_then_exit(sig: int, frame: Any) -> None:
        drain()
        handle_exit(sig, frame)

    signal.signal(signal.SIGTERM, drain_then_exit)  # the worker registered its handler before this hook


def worker_exit(server: Any, worker: Any) -> None:
    """Stop the job service in the worker, before the interpreter's exit drains the pool."""
    from flask import Flask

    from whisper_flask.extension import get_service

    app = getattr(worker, "wsgi", None)
    if isinstance(app, Flask):
        get_service(app).stop()
