"""The service under real gunicorn with deploy/gunicorn.conf.py, driven with curl on loopback."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path

import openai
import pytest

from tests.helpers import (
    FIXTURES,
    SPOKEN,
    LiveClient,
    assert_same_json_transcript,
    eventually,
    speech,
    submit,
    transcribing,
    transcripts,
    wait_for,
    wait_until,
)
from tests.servers import Servers, curl


def test_curl_walkthrough_upload_poll_download(servers: Servers, tmp_path: Path, api_key: str) -> None:
    port, _ = servers.gunicorn(MAX_WORKERS="1")
    base = f"http://127.0.0.1:{port}"
    key = ("-H", f"Authorization: Bearer {api_key}")
    status, body = curl(*key, "-F", f"file=@{FIXTURES / 'report.wav'}", f"{base}/upload")
    assert status == 202
    job_id = json.loads(body)["transcription_id"]
    done = wait_for(LiveClient(port, api_key), job_id)
    assert done["status"] == "completed"
    target = tmp_path / "download"
    for name, args in [
        ("by key", [*key, f"{base}/download/{job_id}.txt"]),
        ("signed link", [base + done["download_url"]]),
    ]:
        (target / name).mkdir(parents=True)
        status, _ = curl("--remote-name", "--remote-header-name", "--output-dir", str(target / name), *args)
        assert status == 200, name
        text = (target / name / "report.txt").read_text().lower()
        assert all(words.lower() in text for words in SPOKEN["report.wav"]), text
    status, body = curl(*key, "-F", "file=@/dev/null;filename=empty.wav", f"{base}/upload")
    assert (status, json.loads(body)["code"]) == (400, "empty_file")
    status, body = curl("-F", f"file=@{FIXTURES / 'report.wav'}", f"{base}/upload")
    assert (status, json.loads(body)["code"]) == (401, "missing_api_key")


def test_first_start_prints_an_admin_key_once(servers: Servers, tmp_path: Path) -> None:
    port, server = servers.gunicorn()
    logged = (tmp_path / "logs" / "whisper_flask.log").read_text()
    keys = re.findall(r"^    (wf_\S+)$", logged, re.MULTILINE)
    assert len(keys) == 1 and "It is shown only this once" in logged
    printed = "".join(path.read_text() for path in tmp_path.glob("gunicorn-*.log"))
    assert keys[0] in printed, "the key goes to the console too"
    client = LiveClient(port, keys[0])
    assert wait_for(client, submit(client, FIXTURES / "fox.wav"))["status"] == "completed"
    servers.stop(server)
    servers.stop(servers.gunicorn().process)
    logged = (tmp_path / "logs" / "whisper_flask.log").read_text()
    assert len(re.findall(r"^    (wf_\S+)$", logged, re.MULTILINE)) == 1, "a key exists now: none is made again"


def test_sigterm_puts_the_running_job_back_and_a_restart_finishes_it(
    servers: Servers, tmp_path: Path, api_key: str
) -> None:
    port, arbiter = servers.gunicorn(MAX_WORKERS="1")
    client = LiveClient(port, api_key)
    audio = speech(tmp_path / "long.wav", 120, list(SPOKEN))
    running = submit(client, audio)
    waiting = submit(client, FIXTURES / "fox.wav")
    wait_until(client, running, transcribing)

    arbiter.send_signal(signal.SIGTERM)  # as systemd stops the service
    assert arbiter.wait(timeout=90) == 0

    servers.gunicorn(MAX_WORKERS="1")
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
    assert (got["txt"], got["srt"]) == (expected["txt"], expected["srt"])
    # Its two parts' windows shared decoder steps with different partners before and after the restart.
    assert_same_json_transcript(got["json"], expected["json"])


def test_sigterm_answers_a_waiting_openai_request_and_still_puts_its_job_back(
    servers: Servers, tmp_path: Path, api_key: str
) -> None:
    port, arbiter = servers.gunicorn(MAX_WORKERS="1")
    client = LiveClient(port, api_key)
    audio = speech(tmp_path / "long.wav", 120, list(SPOKEN))
    answers: list[openai.APIError] = []

    def transcribe() -> None:
        openai_client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0)
        with pytest.raises(openai.APIError) as error, audio.open("rb") as file:
            openai_client.audio.transcriptions.create(file=file, model="whisper-1")
        answers.append(error.value)

    waiting = threading.Thread(target=transcribe)
    waiting.start()
    eventually(lambda: bool(client.get("/jobs").get_json()["jobs"]))
    job_id = client.get("/jobs").get_json()["jobs"][0]["transcription_id"]
    wait_until(client, job_id, transcribing)

    signalled = time.monotonic()
    arbiter.send_signal(signal.SIGTERM)
    assert arbiter.wait(timeout=90) == 0
    # Well inside graceful_timeout (60 s), after which the arbiter would SIGKILL the worker.
    assert time.monotonic() - signalled < 30, "the waiting request held the stop"
    waiting.join(10)
    assert [(getattr(answer, "status_code", None), answer.code) for answer in answers] == [(503, "shutting_down")]

    servers.gunicorn(MAX_WORKERS="1")
    assert wait_for(client, job_id)["status"] == "completed"
    assert client.get(f"/jobs/{job_id}").get_json()["attempts"] == 1, "a graceful stop costs no attempt"
