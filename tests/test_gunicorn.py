"""The service under real gunicorn with deploy/gunicorn.conf.py, driven with curl on loopback."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

from tests.conftest import FIXTURES, SPOKEN, StartGunicorn
from tests.servers import curl
from tests.test_end_to_end import speech


def poll(base: str, job_id: str, *statuses: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = json.loads(curl(f"{base}/progress/{job_id}")[1])
        if body["status"] in statuses:
            return body
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach {statuses}")


def test_curl_walkthrough_upload_poll_download(gunicorn: StartGunicorn, tmp_path: Path) -> None:
    port, _ = gunicorn(MAX_WORKERS="1")
    base = f"http://127.0.0.1:{port}"
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


def test_sigterm_puts_the_running_job_back_and_a_restart_finishes_it(gunicorn: StartGunicorn, tmp_path: Path) -> None:
    port, arbiter = gunicorn(MAX_WORKERS="1")
    base = f"http://127.0.0.1:{port}"
    audio = speech(tmp_path / "long.wav", 120, list(SPOKEN))
    running = json.loads(curl("-F", f"file=@{audio}", f"{base}/upload")[1])["transcription_id"]
    waiting = json.loads(curl("-F", f"file=@{FIXTURES / 'fox.wav'}", f"{base}/upload")[1])["transcription_id"]
    while json.loads(curl(f"{base}/progress/{running}")[1])["processed_seconds"] == 0:
        time.sleep(0.05)  # transcribing, past its first window

    arbiter.send_signal(signal.SIGTERM)  # as systemd stops the service
    assert arbiter.wait(timeout=90) == 0

    gunicorn(MAX_WORKERS="1")
    record = json.loads(curl(f"{base}/jobs/{running}")[1])
    assert record["status"] in ("pending", "in_progress") and record["attempts"] <= 1
    assert poll(base, running, "completed", "failed", timeout=180)["status"] == "completed"
    assert poll(base, waiting, "completed", "failed")["status"] == "completed"
    assert json.loads(curl(f"{base}/jobs/{running}")[1])["attempts"] == 1, "a graceful stop costs no attempt"
    resumed = re.search(rf"job {running} resumes at ([\d.]+) s", (tmp_path / "logs" / "whisper_flask.log").read_text())
    assert resumed and float(resumed.group(1)) > 0, "the interrupted job must resume, not start over"
    undisturbed = json.loads(curl("-F", f"file=@{audio}", f"{base}/upload")[1])["transcription_id"]
    poll(base, undisturbed, "completed", timeout=180)
    for fmt in ("txt", "srt", "json"):
        assert curl(f"{base}/download/{running}.{fmt}")[1] == curl(f"{base}/download/{undisturbed}.{fmt}")[1]
