"""The service under real gunicorn with deploy/gunicorn.conf.py, driven with curl on loopback."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

from bench.loopback import curl
from tests.helpers import (
    FIXTURES,
    SPOKEN,
    LiveClient,
    StartGunicorn,
    speech,
    submit,
    transcribing,
    transcripts,
    wait_for,
    wait_until,
)


def test_curl_walkthrough_upload_poll_download(gunicorn: StartGunicorn, tmp_path: Path) -> None:
    port, _ = gunicorn(MAX_WORKERS="1")
    base = f"http://127.0.0.1:{port}"
    status, body = curl("-F", f"file=@{FIXTURES / 'report.wav'}", f"{base}/upload")
    assert status == 202
    job_id = json.loads(body)["transcription_id"]
    assert wait_for(LiveClient(port), job_id)["status"] == "completed"
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
    client = LiveClient(port)
    audio = speech(tmp_path / "long.wav", 120, list(SPOKEN))
    running = submit(client, audio)
    waiting = submit(client, FIXTURES / "fox.wav")
    wait_until(client, running, transcribing)

    arbiter.send_signal(signal.SIGTERM)  # as systemd stops the service
    assert arbiter.wait(timeout=90) == 0

    gunicorn(MAX_WORKERS="1")
    record = client.get(f"/jobs/{running}").get_json()
    assert record["status"] in ("pending", "in_progress") and record["attempts"] <= 1
    assert wait_for(client, running)["status"] == "completed"
    assert wait_for(client, waiting)["status"] == "completed"
    assert client.get(f"/jobs/{running}").get_json()["attempts"] == 1, "a graceful stop costs no attempt"
    resumed = re.search(rf"job {running} resumes at ([\d.]+) s", (tmp_path / "logs" / "whisper_flask.log").read_text())
    assert resumed and float(resumed.group(1)) > 0, "the interrupted job must resume, not start over"
    undisturbed = submit(client, audio)
    assert wait_for(client, undisturbed)["status"] == "completed"
    got, expected = transcripts(client, running), transcripts(client, undisturbed)
    assert {fmt: got[fmt] for fmt in ("txt", "srt", "json")} == {fmt: expected[fmt] for fmt in ("txt", "srt", "json")}
