"""The deployment files, each proven with the real program: nginx, gunicorn, systemd-analyze, shellcheck."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest

from tests.helpers import FIXTURES, LiveClient, create_key, speech, wait_for
from tests.servers import DEPLOY, ROOT, Servers, curl, free_port, render_nginx
from whisper_flask.settings import Settings

UNIT = DEPLOY / "systemd" / "whisper-flask.service"
WORKER_UNIT = DEPLOY / "systemd" / "whisper-flask-worker.service"
UNITS = pytest.mark.parametrize("shipped", [UNIT, WORKER_UNIT], ids=["gunicorn", "worker"])
INSTALL = DEPLOY / "install.sh"
#: Cluster URLs with passwords, at addresses (resolving needs no DNS); no output may show a password.
DATABASE_URL = "postgresql://whisper:db-s3cret@192.0.2.10:5432/whisper"
BROKER_URL = "redis://:broker-s3cret@192.0.2.11:6379/0"


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


def local_unit(shipped: Path, directory: Path) -> Path:
    """The unit as shipped, with its /opt/whisper-flask install prefix pointed at this checkout."""
    unit = directory / shipped.name
    unit.write_text(
        shipped.read_text()
        .replace("/opt/whisper-flask/venv", str(Path(sys.executable).parent.parent))
        .replace("/opt/whisper-flask/app", str(ROOT))
    )
    return unit


def verify(unit: Path) -> tuple[int, str]:
    result = subprocess.run(["systemd-analyze", "verify", unit.name], capture_output=True, text=True, cwd=unit.parent)
    return result.returncode, result.stdout + result.stderr


def exposure(unit: Path) -> float:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)], capture_output=True, text=True
    )
    score = re.search(rf"Overall exposure level for {re.escape(unit.name)}: (\d+\.\d+)", result.stdout)
    assert score is not None, result.stdout + result.stderr
    return float(score.group(1))


@UNITS
def test_systemd_unit_verifies_cleanly(tmp_path: Path, shipped: Path) -> None:
    assert verify(local_unit(shipped, tmp_path)) == (0, "")


@UNITS
def test_systemd_unit_exposure_is_at_most_2(shipped: Path) -> None:
    # The worker's sandbox is the gunicorn unit's; only its program and its stop differ.
    assert exposure(shipped) <= 2.0


def install(*options: str) -> subprocess.CompletedProcess[str]:
    """deploy/install.sh with these options; only ever with --dry-run here (it changes nothing)."""
    assert "--dry-run" in options
    return subprocess.run([str(INSTALL), *options], capture_output=True, text=True, timeout=60)


def dropin(output: str) -> str:
    """The cluster drop-in a dry run shows, indented under its `drop-in:` line."""
    return "".join(line[4:] + "\n" for line in output.splitlines() if line.startswith("    "))


@pytest.mark.parametrize(("role", "unit"), [("api", UNIT), ("worker", WORKER_UNIT)], ids=["api", "worker"])
def test_a_cluster_roles_unit_with_its_dropin_verifies_and_reaches_only_its_hosts(
    tmp_path: Path, role: str, unit: Path
) -> None:
    result = install("--dry-run", "--role", role, "--database-url", DATABASE_URL, "--broker-url", BROKER_URL)
    assert result.returncode == 0, result.stderr
    assert f"unit: /etc/systemd/system/{unit.name}" in result.stdout
    assert ("nginx" in result.stdout) is (role == "api")
    assert ("models fetch" in result.stdout) is (role == "worker"), "an API node loads no model"
    assert "s3cret" not in result.stdout + result.stderr, "the URLs hold passwords"
    conf = dropin(result.stdout)
    allowed = re.findall(r"^IPAddressAllow=(.*)$", conf, re.MULTILINE)
    assert len(allowed) == 1 and {"192.0.2.10", "192.0.2.11"} <= set(allowed[0].split()), conf
    assert not {"127.0.0.1", "::1", "localhost", "any"} & set(allowed[0].split()), "loopback is the unit's own"
    # systemd-analyze reads the drop-in from <unit>.d beside the unit: any line it refuses fails here.
    local = local_unit(unit, tmp_path)
    (tmp_path / f"{unit.name}.d").mkdir()
    (tmp_path / f"{unit.name}.d" / "cluster.conf").write_text(conf)
    assert verify(local) == (0, "")
    assert exposure(local) <= 2.0


def test_the_one_machine_install_gets_no_dropin_and_no_worker() -> None:
    result = install("--dry-run")
    assert result.returncode == 0, result.stderr
    assert "unit: /etc/systemd/system/whisper-flask.service" in result.stdout
    assert "nginx" in result.stdout and "models fetch" in result.stdout
    assert "drop-in" not in result.stdout and "worker" not in result.stdout
    assert install("--dry-run", "--role", "single").stdout == result.stdout


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--role", "cluster"], "--role is single, api or worker"),
        (["--role", "worker"], "--role worker needs --database-url and --broker-url"),
        (["--role", "api", "--database-url", DATABASE_URL], "--role api needs --database-url and --broker-url"),
        (["--broker-url", BROKER_URL], "are for --role api and worker"),
        (["--role", "worker", "--database-url", BROKER_URL, "--broker-url", BROKER_URL],
         "--database-url must be a URL starting postgresql:// or postgres://"),
        (["--role", "worker", "--database-url", DATABASE_URL, "--broker-url", DATABASE_URL],
         "--broker-url must be a URL starting redis:// or rediss:// or amqp:// or amqps://"),
        (["--role", "worker", "--database-url", DATABASE_URL.replace("db-s3cret", "it's-s3cret"),
          "--broker-url", BROKER_URL], "percent-encode it"),
        (["--role", "worker", "--database-url", DATABASE_URL, "--broker-url", BROKER_URL, "--uninstall"], "usage:"),
        (["--role"], "usage:"),
    ],
)  # fmt: skip
def test_install_refuses_wrong_options_without_showing_a_password(options: list[str], says: str) -> None:
    result = install("--dry-run", *options)
    assert result.returncode == 2 and says in result.stderr, result.stderr
    assert "s3cret" not in result.stdout + result.stderr


def test_install_names_a_host_it_cannot_resolve() -> None:
    url = DATABASE_URL.replace("192.0.2.10", "whisper-db.invalid")
    result = install("--dry-run", "--role", "worker", "--database-url", url, "--broker-url", BROKER_URL)
    assert result.returncode == 1 and "cannot resolve whisper-db.invalid (the database's host)" in result.stderr
    assert "s3cret" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("url", "hosts"),
    [
        ("postgresql://u:p@db.example:5432/whisper", ["db.example"]),
        ("postgresql://u:p%2Fq@[2001:db8::5]:5432/whisper?sslmode=require", ["2001:db8::5"]),
        ("postgresql://u:p@db1.example:5432,db2.example/whisper", ["db1.example", "db2.example"]),
        ("redis://:p@cache.example/0", ["cache.example"]),
        ("amqp://u:p:q@mq.example//", ["mq.example"]),
    ],
)
def test_install_allows_the_hosts_python_reads_in_each_url(url: str, hosts: list[str]) -> None:
    # The same hosts as the settings' parser (urlsplit) finds in a URL with one host.
    script = f'source <(sed -n "/^url_hosts()/,/^}}/p" {INSTALL}); url_hosts "$1"'
    result = subprocess.run(["bash", "-c", script, "bash", url], capture_output=True, text=True, check=True)
    assert result.stdout.split() == hosts
    if len(hosts) == 1:
        assert urlsplit(url).hostname == hosts[0]


def test_unit_stops_gunicorn_within_its_graceful_timeout() -> None:
    unit = UNIT.read_text()
    stop_after = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE).group(1))  # type: ignore[union-attr]
    graceful = re.search(r'"WHISPER_FLASK_GRACEFUL_TIMEOUT", "(\d+)"', (DEPLOY / "gunicorn.conf.py").read_text())
    assert graceful is not None and stop_after > int(graceful.group(1))
    assert "KillMode=mixed" in unit


def test_worker_unit_gives_celery_a_warm_shutdown() -> None:
    # SIGTERM to Celery alone (its warm shutdown puts the running jobs back to pending), and time for it.
    unit = WORKER_UNIT.read_text()
    assert {"KillMode=mixed", "KillSignal=SIGTERM", "TimeoutStopSec=90"} <= set(unit.splitlines())
    start = re.search(r"^ExecStart=(.*)$", unit, re.MULTILINE)
    assert start is not None and " -A whisper_flask.worker worker --hostname whisper-flask@%H" in start.group(1)
    # The same files and settings as the gunicorn unit.
    shared = ("User=", "Group=", "WorkingDirectory=", "Environment=WHISPER_FLASK_", "EnvironmentFile=", "UMask=")
    lines = {line for line in UNIT.read_text().splitlines() if line.startswith(shared)} - {
        "Environment=WHISPER_FLASK_PROXY_FIX=1"
    }
    assert lines <= set(unit.splitlines())


@pytest.mark.parametrize(
    "script", ["deploy/install.sh", "deploy/system-packages.sh", "deploy/whisper-flask", ".ci/run"]
)
def test_shell_scripts_pass_shellcheck(script: str) -> None:
    result = subprocess.run(["shellcheck", str(ROOT / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
