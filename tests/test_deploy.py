"""The deployment files, each proven with the real program: nginx, gunicorn, systemd-analyze, shellcheck."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import openai
import pytest

from tests.helpers import FIXTURES, LiveClient, create_key, speech, wait_for
from tests.servers import DEPLOY, ROOT, Servers, curl, free_port, render_nginx
from whisper_flask.settings import Settings

UNIT = DEPLOY / "systemd" / "whisper-flask.service"


@pytest.mark.nginx
@pytest.mark.parametrize("subpath", [False, True])
def test_nginx_accepts_the_shipped_site(tmp_path: Path, subpath: bool) -> None:
    conf = render_nginx(tmp_path, upstream=8000, http=free_port(), https=free_port(), subpath=subpath)
    result = subprocess.run(["nginx", "-t", "-c", str(conf), "-p", str(conf.parent)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


@pytest.mark.parametrize("snippet", ["whisper-flask-locations.conf", "whisper-flask-subpath.conf"])
def test_nginx_body_limit_equals_the_apps_upload_limit(snippet: str) -> None:
    locations = (DEPLOY / "nginx" / snippet).read_text()
    limits = re.findall(r"client_max_body_size (\d+)m;", locations)
    assert limits and {int(limit) for limit in limits} == {Settings.MAX_UPLOAD_MB}
    assert f"WHISPER_FLASK_MAX_UPLOAD_MB={Settings.MAX_UPLOAD_MB}" in (DEPLOY / "install.sh").read_text()


def test_nginx_413_names_the_apps_upload_limit() -> None:
    locations = (DEPLOY / "nginx" / "whisper-flask-locations.conf").read_text()
    assert f"the {Settings.MAX_UPLOAD_MB} MB limit" in locations


def test_nginx_serves_no_directory() -> None:
    for name in ("whisper-flask.conf", "whisper-flask-locations.conf", "whisper-flask-subpath.conf"):
        text = (DEPLOY / "nginx" / name).read_text()
        assert not re.search(r"^\s*(root|alias|autoindex)\b", text, re.MULTILINE), name


@pytest.fixture
def stack(servers: Servers, api_key: str) -> LiveClient:
    """gunicorn behind nginx, both limiting uploads to 2 MB; a client of nginx with an admin key."""
    servers.gunicorn(MAX_UPLOAD_MB="2", PROXY_FIX="1")
    http, _ = servers.nginx(max_body_mb=2)
    return LiveClient(http, api_key)


def base_url(client: LiveClient) -> str:
    return f"http://127.0.0.1:{client.port}"


@pytest.mark.nginx
def test_upload_poll_and_download_through_nginx_with_keys(stack: LiveClient, tmp_path: Path) -> None:
    audio = speech(tmp_path / "meeting.wav", 45, ["train.wav", "garden.wav"])
    assert audio.stat().st_size > 1024 * 1024, "the upload must exceed nginx's in-memory body buffer"
    # From 127.0.0.2 with a forged header: the app must see the address nginx saw.
    status, body = curl(
        "--interface", "127.0.0.2", "-H", "X-Forwarded-For: 203.0.113.9", "-H", f"X-API-Key: {stack.key}",
        "-F", f"file=@{audio}", f"{base_url(stack)}/upload",
    )  # fmt: skip
    assert status == 202, body
    job_id = json.loads(body)["transcription_id"]
    logged = (tmp_path / "logs" / "whisper_flask.log").read_text()
    assert f"job {job_id} pending: meeting.wav from 127.0.0.2" in logged, "ProxyFix must trust nginx's header"
    assert "203.0.113.9" not in logged, "a client's forged X-Forwarded-For must not be trusted"
    assert stack.key is not None and stack.key not in logged, "keys are never logged"
    assert wait_for(stack, job_id)["status"] == "completed"
    response = stack.get(f"/download/{job_id}.txt")
    assert response.status_code == 200 and b"tomorrow morning" in response.get_data().lower()
    # Another user's key through nginx: the job does not exist for it; no key: 401 with the challenge.
    other = LiveClient(stack.port, create_key(tmp_path, "other"))
    assert other.get(f"/progress/{job_id}").get_json()["code"] == "job_not_found"
    anonymous = LiveClient(stack.port).get(f"/progress/{job_id}")
    assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.nginx
def test_a_raw_body_upload_through_nginx_is_transcribed(stack: LiveClient) -> None:
    status, body = curl(
        "-H", f"X-API-Key: {stack.key}", "-H", "Content-Type: audio/flac",
        "--data-binary", f"@{FIXTURES / 'lj001-0001.flac'}", f"{base_url(stack)}/upload?filename=talk.flac&language=en",
    )  # fmt: skip
    assert status == 202, body
    job_id = json.loads(body)["transcription_id"]
    assert wait_for(stack, job_id)["filename"] == "talk.flac"
    assert b"printing" in stack.get(f"/download/{job_id}.txt").get_data().lower()


@pytest.mark.nginx
def test_oversized_upload_gets_413_json_from_nginx(stack: LiveClient, tmp_path: Path) -> None:
    big = tmp_path / "big.wav"
    big.write_bytes(b"\0" * (3 * 1024 * 1024))
    status, body = curl("-H", f"X-API-Key: {stack.key}", "-F", f"file=@{big}", f"{base_url(stack)}/upload")
    assert status == 413
    assert json.loads(body)["code"] == "too_large"


@pytest.mark.nginx
def test_openai_stream_passes_nginx_window_by_window(stack: LiveClient) -> None:
    client = openai.OpenAI(base_url=f"{base_url(stack)}/v1", api_key=stack.key, max_retries=0)
    with (FIXTURES / "lj001-chapter-70s.opus").open("rb") as audio:
        events = iter(client.audio.transcriptions.create(file=audio, model="whisper-1", stream=True))
        first = next(events)
        first_at = time.time()
        rest = list(events)
    assert first.type == "transcript.text.delta" and rest[-1].type == "transcript.text.done"
    job = stack.get("/jobs").get_json()["jobs"][0]
    assert job["status"] == "completed"
    assert first_at < datetime.fromisoformat(job["finished_at"]).timestamp(), "nginx held the events back"


@pytest.mark.nginx
def test_openai_client_reads_nginx_413_in_openai_envelope(stack: LiveClient) -> None:
    client = openai.OpenAI(base_url=f"{base_url(stack)}/v1", api_key=stack.key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as error:
        client.audio.transcriptions.create(file=("big.wav", b"\0" * (3 * 1024 * 1024)), model="whisper-1")
    assert (error.value.status_code, error.value.code, error.value.type) == (413, "too_large", "invalid_request_error")


@pytest.mark.nginx
def test_upload_flood_gets_429_json_and_polling_is_not_limited(stack: LiveClient) -> None:
    # Requests without a file part: each is refused by the app at once, so only the limit is at work.
    key, base = ("-H", f"X-API-Key: {stack.key}"), base_url(stack)
    statuses = [curl(*key, "-X", "POST", "-F", "note=x", f"{base}/upload") for _ in range(15)]
    limited = [body for status, body in statuses if status == 429]
    assert [status for status, _ in statuses[:11]] == [400] * 11, "the burst of 10 (+1) passes"
    assert limited and json.loads(limited[0])["code"] == "rate_limited"
    assert all(curl(*key, f"{base}/queue")[0] == 200 for _ in range(20))


def test_systemd_unit_verifies_cleanly(tmp_path: Path) -> None:
    # The unit as shipped, with its /opt/whisper-flask install prefix pointed at this checkout.
    unit = tmp_path / "whisper-flask.service"
    unit.write_text(
        UNIT.read_text()
        .replace("/opt/whisper-flask/venv", str(Path(sys.executable).parent.parent))
        .replace("/opt/whisper-flask/app", str(ROOT))
    )
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, cwd=tmp_path)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_systemd_unit_exposure_is_at_most_2() -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)], capture_output=True, text=True
    )
    score = re.search(r"Overall exposure level for whisper-flask.service: (\d+\.\d+)", result.stdout)
    assert score is not None, result.stdout + result.stderr
    assert float(score.group(1)) <= 2.0


def test_unit_stops_gunicorn_within_its_graceful_timeout() -> None:
    unit = UNIT.read_text()
    stop_after = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE).group(1))  # type: ignore[union-attr]
    graceful = re.search(r'"WHISPER_FLASK_GRACEFUL_TIMEOUT", "(\d+)"', (DEPLOY / "gunicorn.conf.py").read_text())
    assert graceful is not None and stop_after > int(graceful.group(1))
    assert "KillMode=mixed" in unit


@pytest.mark.parametrize(
    "script", ["deploy/install.sh", "deploy/system-packages.sh", "deploy/whisper-flask", ".ci/run"]
)
def test_shell_scripts_pass_shellcheck(script: str) -> None:
    result = subprocess.run(["shellcheck", str(ROOT / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
