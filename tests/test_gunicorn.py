"""The service under real gunicorn with deploy/gunicorn.conf.py, driven with curl on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, SPOKEN
from tests.test_end_to_end import speech

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def curl(*args: str) -> tuple[int, bytes]:
    """Run curl; return (HTTP status, body)."""
    out = subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "30", "--write-out", "\n%{http_code}", *args],
        capture_output=True,
        check=True,
    ).stdout
    body, _, status = out.rpartition(b"\n")
    return int(status), body


@pytest.fixture
def gunicorn(tmp_path: Path, model_dir: Path) -> Iterator[Callable[[], tuple[str, subprocess.Popen[bytes]]]]:
    """Start gunicorn (again) on the same directories; returns its base URL and process once ready."""
    port = free_port()
    env = {
        **os.environ,
        "WHISPER_FLASK_BIND": f"127.0.0.1:{port}",
        "WHISPER_FLASK_MODEL": "tiny.en",
        "WHISPER_FLASK_MODEL_DIR": str(model_dir),
        "WHISPER_FLASK_MODEL_DOWNLOAD": "false",
        "WHISPER_FLASK_UPLOAD_DIR": str(tmp_path / "uploads"),
        "WHISPER_FLASK_TRANSCRIPT_DIR": str(tmp_path / "transcripts"),
        "WHISPER_FLASK_LOG_DIR": str(tmp_path / "logs"),
        "WHISPER_FLASK_MAX_WORKERS": "1",
    }
    processes: list[subprocess.Popen[bytes]] = []
    base = f"http://127.0.0.1:{port}"

    def start() -> tuple[str, subprocess.Popen[bytes]]:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / f"gunicorn-{len(processes)}.log").open("wb"),
        )
        processes.append(process)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / f"gunicorn-{len(processes) - 1}.log").read_text()
            try:
                if curl(f"{base}/readyz")[0] == 200:
                    return base, process
            except subprocess.CalledProcessError:
                pass  # not listening yet
            time.sleep(0.2)
        raise AssertionError("gunicorn did not become ready")

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def poll(base: str, job_id: str, *statuses: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = json.loads(curl(f"{base}/progress/{job_id}")[1])
        if body["status"] in statuses:
            return body
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach {statuses}")


Start = Callable[[], tuple[str, subprocess.Popen[bytes]]]


def test_curl_walkthrough_upload_poll_download(gunicorn: Start, tmp_path: Path) -> None:
    base, _ = gunicorn()
    status, body = curl("-F", f"file=@{FIXTURES / 'report.wav'}", f"{base}/upload")
    assert status == 202
    job_id = json.loads(body)["transcription_id"]
    assert poll(base, job_id, "completed", "failed")["status"] == "completed"
    target = tmp_path / "download"
    target.mkdir()
    status, _ = curl(
        "--remote-name", "--remote-header-name", "--output-dir", str(target), f"{base}/download/{job_id}.txt"
    )
    assert status == 200
    text = (target / "report.txt").read_text().lower()
    assert all(words.lower() in text for words in SPOKEN["report.wav"]), text
    status, body = curl("-F", "file=@/dev/null;filename=empty.wav", f"{base}/upload")
    assert (status, json.loads(body)["code"]) == (400, "empty_file")


def test_sigterm_puts_the_running_job_back_and_a_restart_finishes_it(gunicorn: Start, tmp_path: Path) -> None:
    base, arbiter = gunicorn()
    audio = speech(tmp_path / "long.wav", 120, list(SPOKEN))
    running = json.loads(curl("-F", f"file=@{audio}", f"{base}/upload")[1])["transcription_id"]
    waiting = json.loads(curl("-F", f"file=@{FIXTURES / 'fox.wav'}", f"{base}/upload")[1])["transcription_id"]
    while json.loads(curl(f"{base}/progress/{running}")[1])["processed_seconds"] == 0:
        time.sleep(0.05)  # transcribing, past its first window

    arbiter.send_signal(signal.SIGTERM)  # as systemd stops the service
    assert arbiter.wait(timeout=90) == 0

    base, _ = gunicorn()
    record = json.loads(curl(f"{base}/jobs/{running}")[1])
    assert record["status"] in ("pending", "in_progress") and record["attempts"] <= 1
    assert poll(base, running, "completed", "failed", timeout=180)["status"] == "completed"
    assert poll(base, waiting, "completed", "failed")["status"] == "completed"
    assert json.loads(curl(f"{base}/jobs/{running}")[1])["attempts"] == 1, "a graceful stop costs no attempt"
