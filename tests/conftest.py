"""Fixtures shared by the tests, and the markers that say what each test needs.

A test is marked for what it needs from the fixtures it uses, and `slow` follows from those marks:
`pytest -m "not slow"` runs only the tests on the fake engine, in about a minute, while editing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from playwright.sync_api import Browser, Page, Playwright, sync_playwright
from werkzeug.serving import make_server

from tests.helpers import FakeEngine, Served, base_config, chromium, create_key, keyed_client_class, watched_page
from tests.servers import AudioSite, Postgres, Servers, serving
from whisper_flask import create_app
from whisper_flask.engine.checkpoints import ensure_checkpoint
from whisper_flask.extension import get_service

#: What a test needs, known from the fixtures it uses directly or through other fixtures.
NEEDED_BY_FIXTURE = {
    "model_dir": "model",  # the real tiny.en (or base): make_real_app, the servers, models loaded by hand
    "servers": "gunicorn",
    "module_servers": "gunicorn",
    "playwright": "browser",  # under every browser: `browser`, and those launched with flags of their own
}
#: Needs that make a test slow: a real model to load, a server process to start, a browser to drive.
SLOW_NEEDS = ("model", "gunicorn", "nginx", "browser")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by the marks added here
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with what its fixtures need, and `slow` when it needs any of SLOW_NEEDS."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        for fixture, need in NEEDED_BY_FIXTURE.items():
            if fixture in fixtures and not item.get_closest_marker(need):
                item.add_marker(need)
        if not item.get_closest_marker("slow") and any(item.get_closest_marker(need) for need in SLOW_NEEDS):
            item.add_marker("slow")


def started(app: Flask) -> Flask:
    """Start the app's service with a new user key, which its test clients send."""
    service = get_service(app)
    name = f"user-{len(service.keys())}"  # apps of one test share their job database
    app.test_client_class = keyed_client_class(service.create_key(name, admin=False))
    service.start()
    return app


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def make_app(tmp_path: Path, engine: FakeEngine) -> Iterator[Callable[..., Flask]]:
    """Build started apps on the fake engine; each is stopped after the test."""
    apps: list[Flask] = []

    def make(**config: Any) -> Flask:
        app = create_app({**base_config(tmp_path), **config}, engine=engine)
        apps.append(app)
        return started(app)

    yield make
    engine.gate.set()
    engine.live_gate.set()
    for app in apps:
        get_service(app).stop()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def serve(make_app: Callable[..., Flask]) -> Iterator[Callable[..., Served]]:
    """Serve apps on the fake engine, made with these settings, over real sockets (werkzeug's server on loopback:
    WebSockets need one); the servers stop after the test."""
    with contextlib.ExitStack() as stack:

        def start(**config: Any) -> Served:
            app = make_app(**config)
            server = stack.enter_context(serving(make_server("127.0.0.1", 0, app, threaded=True)))
            return Served(app, server.server_port)

        yield start


@pytest.fixture
def runner(tmp_path: Path, engine: FakeEngine) -> FlaskCliRunner:
    """A CLI runner on an app that was never started, as `flask --app whisper_flask ...` builds it."""
    return create_app(base_config(tmp_path), engine=engine).test_cli_runner()


@pytest.fixture
def audio_site() -> Iterator[AudioSite]:
    """A loopback web server of audio, redirects and misbehaving bodies (tests/servers.py); stopped after the test."""
    with serving(AudioSite()) as site:
        yield site


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL on a loopback port for the whole run (tests/servers.py); `reset()` empties its database."""
    server = Postgres()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a test's job database is, once on each backend: an SQLite file's path, or an emptied PostgreSQL's URL."""
    if request.param == "sqlite":
        return str(tmp_path / "jobs.sqlite3")
    server: Postgres = request.getfixturevalue("postgres")
    server.reset()
    return server.url


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MODEL_DIR holding tiny.en, converted once from its registry pack."""
    directory = tmp_path_factory.mktemp("models")
    ensure_checkpoint("tiny.en", directory, allow_download=False)
    return directory


@pytest.fixture
def make_real_app(tmp_path: Path, model_dir: Path) -> Iterator[Callable[..., Flask]]:
    """Build apps on the real tiny.en model, started and ready to serve."""
    apps: list[Flask] = []

    def make(**config: Any) -> Flask:
        app = create_app({**base_config(tmp_path), "MODEL_DIR": model_dir, **config})
        apps.append(app)
        get_service(started(app)).parts.engine.wait_until_ready(120)  # type: ignore[attr-defined]
        return app

    yield make
    for app in apps:
        get_service(app).stop()


@pytest.fixture
def api_key(tmp_path: Path) -> str:
    """An admin key in the job database of the test's servers (made before they start, as the installer does)."""
    return create_key(tmp_path, "tester", admin=True)


@pytest.fixture
def servers(tmp_path: Path, model_dir: Path) -> Iterator[Servers]:
    """Real gunicorn (and nginx) with the shipped deploy/ files and tiny.en on the test's directories.

    Every server started is stopped after the test. Tests that want a key made before the first start,
    as the installer does, also ask for `api_key`.
    """
    with Servers(tmp_path, model_dir) as started_servers:
        yield started_servers


@pytest.fixture(scope="module")
def module_servers(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path, request: pytest.FixtureRequest
) -> Iterator[Servers]:
    """As `servers`, for a module's tests to share: one start of the model for many requests; stopped after them."""
    with Servers(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]), model_dir) as started_servers:
        yield started_servers


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    """Playwright for the whole run: its sync API runs once at a time, so every browser is launched from this one."""
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="session")
def browser(playwright: Playwright) -> Iterator[Browser]:
    """Chromium as a person runs it (chromium())."""
    launched = playwright.chromium.launch(executable_path=chromium())
    yield launched
    launched.close()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where pages' screenshots go: pytest's output directory for this run."""
    return tmp_path_factory.mktemp("screenshots", numbered=False)


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh tab whose script errors, CSP violations, dialogs and requests off loopback fail the test."""
    with watched_page(browser) as tab:
        yield tab
