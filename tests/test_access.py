"""API keys, jobs per key, fair share, the failure throttle and signed links."""

from __future__ import annotations

import io
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner

from tests.helpers import (
    FIXTURES,
    FakeEngine,
    LiveClient,
    base_config,
    create_key,
    keyed,
    submit,
    upload,
    wait_for,
    wav_bytes,
)
from tests.servers import Servers
from whisper_flask import create_app
from whisper_flask.extension import get_service

KEYS = ("none", "wrong", "revoked", "other", "own", "admin")


@pytest.fixture(scope="module")
def served(module_servers: Servers, model_dir: Path) -> dict[str, Any]:
    """Real gunicorn on tiny.en with keys of every kind, and completed jobs of 'own': one to read, one to delete."""
    work = module_servers.work
    keys = {name: create_key(work, name, admin=name == "admin") for name in ("own", "other", "admin", "revoked")}
    keys["wrong"] = "wf_" + "x" * 43
    keys["none"] = ""
    port, _ = module_servers.gunicorn(AUTH_FAILURES_PER_MINUTE="1000")
    # Revoked through the CLI while the server runs, as an operator would.
    cli = create_app({**base_config(work), "MODEL_DIR": model_dir})
    assert cli.test_cli_runner().invoke(args=["keys", "revoke", "revoked"]).exit_code == 0
    get_service(cli).stop()
    own = LiveClient(port, keys["own"])
    job_id, doomed = submit(own, FIXTURES / "fox.wav"), submit(own, FIXTURES / "fox.wav")
    assert wait_for(own, job_id)["status"] == wait_for(own, doomed)["status"] == "completed"
    return {"port": port, "keys": keys, "job": job_id, "doomed": doomed, "work": work}


#: route -> (method, path with {job} (or {doomed}: deleted), status for a key that may, status for another user's key)
ROUTES: dict[str, tuple[str, str, int, int]] = {
    "upload": ("POST", "/upload", 202, 202),
    "progress": ("GET", "/progress/{job}", 200, 404),
    "download": ("GET", "/download/{job}.txt", 200, 404),
    "job": ("GET", "/jobs/{job}", 200, 404),
    "jobs": ("GET", "/jobs", 200, 200),
    "delete": ("DELETE", "/jobs/{doomed}", 200, 404),
    "queue": ("GET", "/queue", 200, 200),
    "detect-language": ("POST", "/detect-language", 422, 422),  # tiny.en is English-only
    "openai models": ("GET", "/v1/models", 200, 200),
}


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("route", ROUTES)
def test_each_route_answers_each_kind_of_key_as_it_should(served: dict[str, Any], route: str, key: str) -> None:
    method, path, allowed, other_user = ROUTES[route]
    client = LiveClient(served["port"], served["keys"][key] or None)
    job_id = served["doomed" if "{doomed}" in path else "job"]
    path = path.format(job=job_id, doomed=job_id)
    if method == "POST":
        response = upload(client, wav_bytes(1, amplitude=0), filename="quiet.wav") if route == "upload" else None
        response = response or client.post(path, data={"file": (io.BytesIO(wav_bytes(1)), "a.wav")})
    else:
        response = client.open(method, path)
    body = response.get_json() if response.status_code != 200 or route != "download" else None
    expected = {"none": 401, "wrong": 401, "revoked": 401, "other": other_user}.get(key, allowed)
    assert response.status_code == expected, body
    if expected == 401:
        code = body["error"]["code"] if path.startswith("/v1/") else body["code"]  # OpenAI's envelope under /v1
        assert code == ("missing_api_key" if key == "none" else "invalid_api_key")
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="whisper_flask"'
    if key == "other" and other_user == 404:
        assert body == {"error": f"no job with id {job_id!r}", "code": "job_not_found"}, "as an unknown id"
    if route == "jobs" and expected == 200:
        owners = {job["transcription_id"]: job["owner"] for job in body["jobs"]}
        assert (served["job"] in owners) == (key in ("own", "admin"))
        assert key == "admin" or set(owners.values()) <= {key}, "a key lists its own jobs only"


def test_keys_are_stored_hashed_and_never_logged(served: dict[str, Any]) -> None:
    database = served["work"] / "transcripts" / "jobs.sqlite3"
    dump = "\n".join(sqlite3.connect(database).iterdump())
    logs = "".join(path.read_text() for path in served["work"].rglob("*.log"))
    for name in ("own", "other", "admin", "revoked"):
        secret = served["keys"][name]
        assert secret not in dump and secret not in logs


def test_the_key_is_checked_before_the_upload_body_is_read(served: dict[str, Any]) -> None:
    # Headers that announce 500 MB, and no body: a server reading the body first would wait for it.
    with socket.create_connection(("127.0.0.1", served["port"]), timeout=10) as connection:
        connection.sendall(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wf_wrong\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 524288000\r\n\r\n"
        )
        answer = connection.recv(4096)
    assert answer.startswith(b"HTTP/1.1 401")


def test_a_revoked_key_stops_at_once_and_its_jobs_stay_for_admins(
    make_app: Callable[..., Flask], engine: FakeEngine
) -> None:
    app = make_app(MAX_WORKERS=1)
    bob, admin = keyed(app, "bob"), keyed(app, "root", admin=True)
    engine.gate.clear()
    running, waiting = submit(bob), submit(bob)
    assert engine.in_window.wait(10)
    get_service(app).parts.keys.revoke("bob")
    response = bob.get(f"/progress/{waiting}")
    assert (response.status_code, response.get_json()["code"]) == (401, "invalid_api_key")
    records = {job["transcription_id"]: job for job in admin.get("/jobs").get_json()["jobs"]}
    assert records[waiting]["status"] == "pending" and records[running]["status"] == "in_progress"
    engine.gate.set()
    assert wait_for(admin, waiting)["status"] == "completed"


def test_each_key_has_a_fair_share_of_the_queue(make_app: Callable[..., Flask], engine: FakeEngine) -> None:
    app = make_app(MAX_WORKERS=1, MAX_JOBS_PER_KEY=2)
    alice, bob = keyed(app, "alice"), keyed(app, "bob")
    engine.gate.clear()
    assert [upload(alice).status_code for _ in range(2)] == [202, 202]
    refused = upload(alice)
    assert (refused.status_code, refused.get_json()["code"]) == (429, "too_many_jobs")
    assert int(refused.headers["Retry-After"]) >= 1
    accepted = upload(bob).get_json()
    assert accepted["queue_position"] == 1, "round-robin: bob's first job starts before alice's second"


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (lambda url: url, None),
        (lambda url: url.replace("signature=", "signature=0"), "link_invalid"),
        (lambda url: url.replace("expires=", "expires=9"), "link_invalid"),
        (lambda url: url.replace(".txt?", ".srt?"), "link_invalid"),
        (lambda url: url.replace("expires=", "expires=x"), "link_invalid"),
    ],
    ids=["valid", "tampered-signature", "tampered-expiry", "other-format", "malformed"],
)
def test_signed_links_open_one_transcript_without_a_key(
    client: Any, app: Flask, change: Callable[[str], str], code: str | None
) -> None:
    record = wait_for(client, submit(client, wav_bytes(35)))
    url = change(record["download_url"])
    response = FlaskClient(app).get(url)  # a plain client: no key
    if code is None:
        assert response.status_code == 200 and b"window 1" in response.get_data()
    else:
        assert (response.status_code, response.get_json()["code"]) == (403, code)


def test_an_expired_link_is_refused(make_app: Callable[..., Flask]) -> None:
    app = make_app(DOWNLOAD_LINK_TTL_S=1)
    client = app.test_client()
    record = wait_for(client, submit(client))
    time.sleep(2.1)
    response = FlaskClient(app).get(record["download_url"])
    assert (response.status_code, response.get_json()["code"]) == (403, "link_expired")


def test_keys_cli_creates_lists_and_revokes_without_showing_keys(runner: FlaskCliRunner) -> None:
    created = runner.invoke(args=["keys", "create", "--name", "ci-bot"])
    secret = created.output.strip()
    assert created.exit_code == 0 and secret.startswith("wf_") and len(secret) >= 43
    assert runner.invoke(args=["keys", "create", "--name", "ci-bot"]).exit_code == 1, "names are unique"
    listed = runner.invoke(args=["keys", "list"]).output
    assert "ci-bot" in listed and "user" in listed and secret not in listed
    assert runner.invoke(args=["keys", "revoke", "ci-bot"]).output.strip() == "revoked ci-bot"
    assert runner.invoke(args=["keys", "revoke", "ci-bot"]).exit_code == 1
    again = runner.invoke(args=["keys", "init"])
    assert again.stdout == "", "keys have existed: init makes none, even with none active"
    assert "every API key is revoked" in again.stderr and "keys create" in again.stderr


def test_keys_init_with_auth_off_makes_no_key_and_claims_no_revoked_keys(tmp_path: Path, engine: FakeEngine) -> None:
    runner = create_app({**base_config(tmp_path), "AUTH": "off"}, engine=engine).test_cli_runner()
    result = runner.invoke(args=["keys", "init"])
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")


def test_auth_off_opens_the_api_and_warns_at_every_start(
    tmp_path: Path, engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app({**base_config(tmp_path), "AUTH": "off"}, engine=engine)
    try:
        assert app.test_client().get("/queue").status_code == 200
        assert "WHISPER_FLASK_AUTH=off: the API is open" in caplog.text
        assert not get_service(app).parts.keys.keys(), "no key is made when auth is off"
    finally:
        get_service(app).stop()


def test_health_endpoints_need_no_key_and_tell_no_state(app: Flask) -> None:
    anonymous = FlaskClient(app)
    assert anonymous.get("/healthz").get_json() == {"status": "ok"}
    assert anonymous.get("/readyz").get_json() == {"status": "ready"}


def test_another_keys_jobs_are_refused_by_the_same_lookups_as_an_unknown_id(
    make_app: Callable[..., Flask], engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(MAX_WORKERS=1)
    alice, bob = keyed(app, "alice"), keyed(app, "bob")
    ended = submit(alice)
    assert wait_for(alice, ended)["status"] == "completed"
    engine.gate.clear()
    running, pending = submit(alice), submit(alice)
    assert engine.in_window.wait(10)
    parts = get_service(app).parts
    calls: list[tuple[str, str]] = []
    for owner, name in ((parts.store, "owner"), (parts.store, "get"), (parts.registry, "view")):
        method = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda job_id, m=method, n=name: calls.append((n, job_id)) or m(job_id))
    ids = (running, pending, ended, "f" * 32)
    answers = {job_id: bob.get(f"/progress/{job_id}") for job_id in ids}
    assert calls == [("owner", job_id) for job_id in ids], "one ownership lookup each, and nothing more"
    assert {answer.status_code for answer in answers.values()} == {404}
    messages = {answer.get_json()["error"].replace(job_id, "") for job_id, answer in answers.items()}
    assert messages == {"no job with id ''"}


def test_a_signed_link_stops_opening_once_its_jobs_key_is_revoked(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    alice = keyed(app, "alice")
    link = wait_for(alice, submit(alice))["download_url"]
    assert FlaskClient(app).get(link).status_code == 200
    get_service(app).revoke_key("alice")
    refused = FlaskClient(app).get(link)
    assert (refused.status_code, refused.get_json()["code"]) == (403, "link_revoked")


def test_a_signed_link_to_a_job_made_with_auth_off_stays_open(make_app: Callable[..., Flask]) -> None:
    app = make_app(AUTH="off")
    client = FlaskClient(app)
    record = wait_for(client, submit(client))
    assert record["owner"] is None and client.get(record["download_url"]).status_code == 200
