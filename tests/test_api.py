"""The HTTP contract on a fake engine (ARCHITECTURE.md, "HTTP contract")."""

from __future__ import annotations

import io
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.helpers import FakeEngine, base_config, eventually, upload, wait_for, wav_bytes
from whisper_flask import create_app
from whisper_flask.engine.options import Task, TranscribeOptions
from whisper_flask.exceptions import JobStopped
from whisper_flask.extension import get_service
from whisper_flask.jobs.pipeline import JobInterrupted
from whisper_flask.jobs.records import Job, JobStatus
from whisper_flask.jobs.registry import JobCancelled
from whisper_flask.jobs.store import SqlJobStore


def test_upload_answers_202_with_the_contracts_body_and_location(client: FlaskClient) -> None:
    response = upload(client)
    body = response.get_json()
    job_id = body["transcription_id"]
    assert response.status_code == 202
    assert len(job_id) == 32 and set(job_id) <= set("0123456789abcdef")
    assert response.headers["Location"] == f"/jobs/{job_id}"
    # One snapshot: a worker may start the job at once, but the answer is of the moment it was queued.
    assert (body["status"], body["progress"], body["queue_position"]) == ("pending", 0, 1)
    assert body["progress_url"] == f"/progress/{job_id}"
    assert body["download_url"].startswith(f"/download/{job_id}.txt?expires=")


def test_job_record_is_committed_before_the_202(app: Flask, client: FlaskClient, engine: FakeEngine) -> None:
    engine.gate.clear()
    job_id = upload(client).get_json()["transcription_id"]
    db = sqlite3.connect(app.config["TRANSCRIPT_DIR"] / "jobs.sqlite3")
    assert db.execute("SELECT filename FROM jobs WHERE id = ?", (job_id,)).fetchone() == ("talk.wav",)


def test_completed_job_reports_100_and_every_format(client: FlaskClient) -> None:
    job_id = upload(client, wav_bytes(65)).get_json()["transcription_id"]
    body = wait_for(client, job_id, "completed")
    assert body["progress"] == 100 and body["stage"] == "done"
    assert body["duration"] == 65 and body["processed_seconds"] == 65
    assert set(body["formats"]) == {"txt", "srt", "vtt", "json", "tsv"}
    assert body["download_url"] == body["formats"]["txt"]


@pytest.mark.parametrize(
    ("fmt", "content_type", "marker"),
    [
        ("txt", "text/plain; charset=utf-8", "window 2"),
        ("srt", "application/x-subrip", "00:01:00,000 --> 00:01:05,000"),
        ("vtt", "text/vtt; charset=utf-8", "WEBVTT"),
        ("json", "application/json", '"segments"'),
        ("tsv", "text/tab-separated-values; charset=utf-8", "60000\t65000\twindow 2"),
    ],
)
def test_download_serves_each_format_as_an_attachment(
    client: FlaskClient, fmt: str, content_type: str, marker: str
) -> None:
    job_id = upload(client, wav_bytes(65), filename="Board meeting.mp3").get_json()["transcription_id"]
    wait_for(client, job_id, "completed")
    response = client.get(f"/download/{job_id}.{fmt}")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == content_type
    assert response.headers["Content-Disposition"] == f'attachment; filename="Board meeting.{fmt}"'
    assert marker in response.get_data(as_text=True)


def test_progress_is_real_and_monotonic_while_transcribing(client: FlaskClient, engine: FakeEngine) -> None:
    engine.gate.clear()
    job_id = upload(client, wav_bytes(100)).get_json()["transcription_id"]
    seen = []
    for _ in range(4):  # windows start at 0, 30, 60, 90 seconds of 100
        assert engine.in_window.wait(10)
        engine.in_window.clear()
        seen.append(client.get(f"/progress/{job_id}").get_json())
        engine.gate.let_one_through()
    engine.gate.set()
    done = wait_for(client, job_id, "completed")
    assert [body["processed_seconds"] for body in seen] == [0, 30, 60, 90]
    # The percentage is time's share (test_estimate.py): here the test's pace, so only its order is known.
    progress = [body["progress"] for body in seen]
    assert progress[0] == 0 and progress == sorted(progress) and progress[-1] < 100
    assert all(body["status"] == "in_progress" and body["stage"] == "transcribing" for body in seen)
    assert seen[-1]["eta_seconds"] is not None and seen[-1]["eta_seconds"] >= 0
    assert done["progress"] == 100


def test_pending_jobs_show_their_queue_position(make_app, engine: FakeEngine) -> None:
    client = make_app(MAX_WORKERS=1).test_client()
    engine.gate.clear()
    running = upload(client).get_json()["transcription_id"]
    assert engine.in_window.wait(10)
    waiting = [upload(client).get_json()["transcription_id"] for _ in range(2)]
    assert client.get(f"/progress/{running}").get_json()["status"] == "in_progress"
    assert [client.get(f"/progress/{j}").get_json()["queue_position"] for j in waiting] == [1, 2]
    assert client.get("/queue").get_json() == {
        "pending": 2, "in_progress": 1, "capacity": 100, "workers": 1,
        "arithmetic": {"encoder": "none", "decoder": "none", "live_encoder": "none"}, "worker_nodes": [],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("form", "code"),
    [
        ({}, "no_file"),
        ({"file": (io.BytesIO(b"abc"), "")}, "no_filename"),
        ({"file": (io.BytesIO(b""), "empty.wav")}, "empty_file"),
    ],
)
def test_upload_rejects_a_missing_or_empty_file(client: FlaskClient, form: dict, code: str) -> None:
    response = client.post("/upload", data=form)
    assert response.status_code == 400
    assert response.get_json()["code"] == code


@pytest.mark.parametrize("query", ["limit=%C2%B2", "offset=%C2%B2", "limit=0", "limit=-1"])
def test_a_page_query_that_is_not_a_plain_number_is_a_bad_request(client: FlaskClient, query: str) -> None:
    response = client.get(f"/jobs?{query}")
    assert (response.status_code, response.get_json()["code"]) == (400, "invalid_query")


@pytest.mark.parametrize("content_type", ["audio/mpeg", "video/mp4", "application/octet-stream"])
def test_a_raw_body_is_an_upload_named_and_configured_by_its_query(client: FlaskClient, content_type: str) -> None:
    response = client.post("/upload?filename=dir/talk.mp3&language=de", data=wav_bytes(2), content_type=content_type)
    assert response.status_code == 202, response.get_json()
    record = client.get(f"/jobs/{response.get_json()['transcription_id']}").get_json()
    assert (record["filename"], record["options"]) == ("talk.mp3", {"language": "de"})


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"", "audio/wav", 400, "empty_file"),
        (b"not a form", "text/plain", 400, "no_file"),
        (bytes(1024 * 1024 + 1), "audio/wav", 413, "too_large"),
    ],
)
def test_a_raw_body_that_is_empty_not_audio_typed_or_too_large_is_refused(
    make_app, body: bytes, content_type: str, status: int, code: str
) -> None:
    client = make_app(MAX_UPLOAD_MB=1).test_client()
    response = client.post("/upload", data=body, content_type=content_type)
    assert (response.status_code, response.get_json()["code"]) == (status, code)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("language", "klingon"),
        ("task", "summarise"),
        ("temperature", "-0.1"),
        ("temperature", "warm"),
        ("beam_size", "11"),
        ("beam_size", "2.5"),
        ("word_timestamps", "maybe"),
        ("prompt", "x" * 2001),
    ],
)
def test_upload_rejects_a_bad_option_naming_the_field(app: Flask, client: FlaskClient, field: str, value: str) -> None:
    response = upload(client, **{field: value})
    body = response.get_json()
    assert response.status_code == 400
    assert body["code"] == "invalid_option" and body["field"] == field and field in body["error"]
    assert list(app.config["UPLOAD_DIR"].iterdir()) == [], "a rejected upload must not stay on disk"


def test_options_from_form_and_query_reach_whisper(client: FlaskClient, engine: FakeEngine) -> None:
    response = client.post(
        "/upload?beam_size=5&task=translate",
        data={
            "file": (io.BytesIO(wav_bytes(1)), "a.wav"),
            "language": "German",
            "prompt": "Glossary: Kubernetes",
            "word_timestamps": "true",
            "temperature": "0",
        },
    )
    wait_for(client, response.get_json()["transcription_id"], "completed")
    assert engine.options == [
        TranscribeOptions(
            language="de",
            task=Task.TRANSLATE,
            initial_prompt="Glossary: Kubernetes",
            word_timestamps=True,
            temperature=0.0,
            beam_size=5,
        )
    ]


@pytest.mark.parametrize(("field", "value"), [("language", "de"), ("task", "translate")])
def test_english_only_model_refuses_other_languages(make_app, engine: FakeEngine, field: str, value: str) -> None:
    engine.is_multilingual = False
    response = upload(make_app().test_client(), **{field: value})
    assert response.status_code == 400
    assert "English-only" in response.get_json()["error"]


def test_upload_over_the_limit_gets_413_json(make_app) -> None:
    client = make_app(MAX_UPLOAD_MB=1).test_client()
    response = upload(client, b"\0" * (2 * 1024 * 1024))
    assert response.status_code == 413
    assert response.get_json()["code"] == "too_large"


def test_full_queue_answers_503_with_retry_after(make_app, engine: FakeEngine) -> None:
    client = make_app(MAX_QUEUED_JOBS=2, MAX_WORKERS=1).test_client()
    engine.gate.clear()
    first, second = (upload(client).status_code for _ in range(2))
    response = upload(client)
    assert (first, second, response.status_code) == (202, 202, 503)
    assert response.get_json()["code"] == "queue_full"
    assert int(response.headers["Retry-After"]) >= 1


def test_upload_is_stored_under_a_server_made_name(app: Flask, client: FlaskClient, engine: FakeEngine) -> None:
    engine.gate.clear()
    data = wav_bytes(2)
    upload(client, data, filename="../../etc/passwd")
    stored = list(app.config["UPLOAD_DIR"].iterdir())
    assert len(stored) == 1 and stored[0].read_bytes() == data
    assert stored[0].name.endswith(".upload") and "passwd" not in stored[0].name


def test_upload_is_deleted_when_its_job_ends(app: Flask, client: FlaskClient) -> None:
    wait_for(client, upload(client).get_json()["transcription_id"], "completed")
    # The pipeline deletes it just after the registry records the job's end.
    eventually(lambda: list(app.config["UPLOAD_DIR"].iterdir()) == [], timeout=10)


def test_keep_uploads_keeps_the_audio(make_app) -> None:
    app = make_app(KEEP_UPLOADS=True)
    client = app.test_client()
    wait_for(client, upload(client).get_json()["transcription_id"], "completed")
    assert len(list(app.config["UPLOAD_DIR"].iterdir())) == 1


def test_download_before_completion_is_409_with_status(client: FlaskClient, engine: FakeEngine) -> None:
    engine.gate.clear()
    job_id = upload(client).get_json()["transcription_id"]
    response = client.get(f"/download/{job_id}.txt")
    body = response.get_json()
    assert response.status_code == 409
    assert body["code"] == "not_ready" and body["status"] in ("pending", "in_progress") and "progress" in body


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("/progress/0123456789abcdef0123456789abcdef", "job_not_found"),
        ("/progress/not-a-job", "job_not_found"),
        ("/jobs/0123456789abcdef0123456789abcdef", "job_not_found"),
        ("/download/0123456789abcdef0123456789abcdef.txt", "job_not_found"),
        ("/download/..%2f..%2fjobs.sqlite3", "not_found"),
        ("/download/%2e%2e.txt", "job_not_found"),
        ("/no/such/page", "not_found"),
    ],
)
def test_unknown_ids_and_paths_get_404_json(client: FlaskClient, url: str, code: str) -> None:
    response = client.get(url)
    assert response.status_code == 404
    assert response.get_json()["code"] == code


def test_unknown_format_of_a_known_job_is_404(client: FlaskClient) -> None:
    job_id = upload(client).get_json()["transcription_id"]
    wait_for(client, job_id, "completed")
    response = client.get(f"/download/{job_id}.sqlite3")
    assert response.status_code == 404 and response.get_json()["code"] == "unknown_format"


def test_wrong_method_gets_405_json_with_allow(client: FlaskClient) -> None:
    response = client.get("/upload")
    assert response.status_code == 405
    assert response.get_json()["code"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]


def test_unexpected_error_gets_500_json_and_is_logged(app: Flask, client: FlaskClient, monkeypatch, caplog) -> None:
    app.config["PROPAGATE_EXCEPTIONS"] = False

    def broken(*args: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(get_service(app), "view", broken)
    response = client.get("/progress/0123456789abcdef0123456789abcdef")
    assert response.status_code == 500
    assert response.get_json()["code"] == "internal_error"
    assert "disk on fire" not in response.get_data(as_text=True)
    assert "disk on fire" in caplog.text


def test_jobs_are_listed_newest_first_and_filtered(client: FlaskClient) -> None:
    ids = [upload(client).get_json()["transcription_id"] for _ in range(3)]
    for job_id in ids:
        wait_for(client, job_id, "completed")
    listed = client.get("/jobs?limit=2").get_json()["jobs"]
    assert [job["transcription_id"] for job in listed] == ids[::-1][:2]
    assert listed[0]["filename"] == "talk.wav" and listed[0]["attempts"] == 1
    assert client.get("/jobs?status=failed").get_json()["jobs"] == []
    assert client.get("/jobs?offset=2").get_json()["jobs"][0]["transcription_id"] == ids[0]


@pytest.mark.parametrize("query", ["status=done", "limit=0", "limit=x", "offset=-1"])
def test_bad_job_listing_query_is_400(client: FlaskClient, query: str) -> None:
    response = client.get(f"/jobs?{query}")
    assert response.status_code == 400 and response.get_json()["code"] == "invalid_query"


def test_cancelling_a_pending_job_removes_it_from_the_queue(make_app, engine: FakeEngine) -> None:
    app = make_app(MAX_WORKERS=1)
    client = app.test_client()
    engine.gate.clear()
    upload(client)
    assert engine.in_window.wait(10)
    pending = upload(client).get_json()["transcription_id"]
    response = client.delete(f"/jobs/{pending}")
    assert response.status_code == 200 and response.get_json()["status"] == "cancelled"
    assert client.get("/queue").get_json()["pending"] == 0
    assert len(list(app.config["UPLOAD_DIR"].iterdir())) == 1  # only the running job's audio
    assert client.delete(f"/jobs/{pending}").get_json()["status"] == "cancelled"  # repeating is harmless


def test_cancelling_a_running_job_stops_it_at_the_next_window(
    app: Flask, client: FlaskClient, engine: FakeEngine
) -> None:
    engine.gate.clear()
    job_id = upload(client, wav_bytes(95)).get_json()["transcription_id"]
    assert engine.in_window.wait(10)
    assert client.delete(f"/jobs/{job_id}").get_json()["status"] == "cancelled"
    engine.gate.set()
    # The job's thread lets go of its audio when it stops, at its next window.
    eventually(lambda: not list(app.config["UPLOAD_DIR"].iterdir()))
    assert len(engine.options) == 1 and client.get(f"/progress/{job_id}").get_json()["status"] == "cancelled"
    assert not list(app.config["TRANSCRIPT_DIR"].glob(f"{job_id}.*"))


def test_a_cancel_passes_through_an_except_exception_in_the_transcribe_loop(
    app: Flask, client: FlaskClient, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert issubclass(JobCancelled, JobStopped) and issubclass(JobInterrupted, JobStopped)
    transcribe = engine.transcribe
    windows: list[Any] = []
    swallowed: list[Exception] = []

    def careless(hook: Callable[..., None]) -> Callable[..., None]:
        def call(*args: Any) -> None:
            try:
                hook(*args)
            except Exception as exc:  # what a broad handler in library code would do to a stop
                swallowed.append(exc)

        return call

    def careless_transcribe(audio: Any, options: Any, on_window: Any, resume: Any, check: Any) -> Any:
        def counted(window: Any) -> None:
            windows.append(window)
            on_window(window)

        return transcribe(audio, options, careless(counted), resume, careless(check))

    monkeypatch.setattr(engine, "transcribe", careless_transcribe)
    engine.gate.clear()
    job_id = upload(client, wav_bytes(95)).get_json()["transcription_id"]  # four windows
    assert engine.in_window.wait(10)
    assert client.delete(f"/jobs/{job_id}").get_json()["status"] == "cancelled"
    engine.gate.set()
    eventually(lambda: not list(app.config["UPLOAD_DIR"].iterdir()))
    assert swallowed == [] and len(windows) == 2, "the loop went on after the cancel"
    assert not list(app.config["TRANSCRIPT_DIR"].glob(f"{job_id}.*"))


def test_a_running_jobs_check_never_waits_for_a_cancels_commit_and_sees_the_cancel_once_committed(
    app: Flask, client: FlaskClient, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.gate.clear()
    job_id = upload(client, wav_bytes(95)).get_json()["transcription_id"]
    assert engine.in_window.wait(10)
    committing, disk = threading.Event(), threading.Event()
    update = SqlJobStore.update

    def slow_commit(store: SqlJobStore, job: Job) -> None:
        if job.status is JobStatus.CANCELLED:  # a disk slow to fsync, under the registry's lock
            committing.set()
            assert disk.wait(10)
        update(store, job)

    monkeypatch.setattr(SqlJobStore, "update", slow_commit)
    deleting = threading.Thread(target=lambda: client.delete(f"/jobs/{job_id}"))
    deleting.start()
    registry = get_service(app).parts.registry
    try:
        assert committing.wait(10)
        with ThreadPoolExecutor(1) as pool:  # what every decoder step and fetched chunk calls
            check = pool.submit(registry.check_active, job_id)
            # The job leaves the registry only once the store has its end (a full disk may refuse it).
            assert check.exception(timeout=2) is None, "the check waited for the disk"
            assert not disk.is_set()
    finally:
        disk.set()
        deleting.join(30)
        assert not deleting.is_alive(), "the cancel's request did not end within 30 s"
        engine.gate.set()
    with pytest.raises(JobCancelled):
        registry.check_active(job_id)


def test_a_crashing_job_fails_and_the_worker_keeps_serving(make_app) -> None:
    client = make_app(MAX_WORKERS=1).test_client()
    bad = upload(client, prompt="crash").get_json()["transcription_id"]
    good = upload(client).get_json()["transcription_id"]
    failed = wait_for(client, bad, "failed")
    assert failed["error_code"] == "transcription_failed" and "asked to crash" in failed["error"]
    assert wait_for(client, good, "completed", "failed")["status"] == "completed"


def test_undecodable_audio_is_refused_at_upload_with_ffmpegs_reason(client: FlaskClient, tmp_path: Path) -> None:
    response = upload(client, b"this is a text file, not audio\n" * 10, filename="notes.mp3")
    body = response.get_json()
    assert (response.status_code, body["code"]) == (400, "invalid_audio")
    assert body["error"].startswith("could not decode audio: ") and "Invalid data" in body["error"]
    assert str(tmp_path) not in body["error"] and ".upload" not in body["error"]
    assert list((tmp_path / "uploads").iterdir()) == [], "a refused upload is not kept"


def test_silence_completes_with_an_empty_transcript(client: FlaskClient, engine: FakeEngine) -> None:
    job_id = upload(client, wav_bytes(40, amplitude=0)).get_json()["transcription_id"]
    wait_for(client, job_id, "completed")
    assert client.get(f"/download/{job_id}.txt").get_data() == b""
    assert engine.options == [], "silence must not reach the model"


def test_healthz_and_readyz(make_app, engine: FakeEngine) -> None:
    client = make_app().test_client()
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").get_json() == {"status": "ready"}
    engine.loaded = False
    response = client.get("/readyz")
    assert (response.status_code, response.get_json()["code"]) == (503, "model_loading")
    assert response.headers["Retry-After"] == "5"
    engine.error = "model fake could not be loaded: no pack"
    response = client.get("/readyz")
    assert response.status_code == 503 and response.get_json()["code"] == "model_unavailable"


def test_a_model_still_loading_answers_alike_everywhere(client: FlaskClient, engine: FakeEngine) -> None:
    engine.loaded = False
    ready = client.get("/readyz")
    detect = client.post("/detect-language", data={"file": (io.BytesIO(wav_bytes(3)), "a.wav")})
    for response in (ready, detect):
        assert (response.status_code, response.get_json()["code"]) == (503, "model_loading")
        assert response.headers["Retry-After"] == "5"


def test_detect_language_answers_top_languages(client: FlaskClient) -> None:
    response = client.post("/detect-language", data={"file": (io.BytesIO(wav_bytes(3)), "a.wav")})
    assert response.get_json() == {
        "language": "de",
        "probability": 0.9,
        "top": [{"language": "de", "probability": 0.9}, {"language": "en", "probability": 0.1}],
    }


def test_detect_language_rejects_undecodable_audio(client: FlaskClient) -> None:
    response = client.post("/detect-language", data={"file": (io.BytesIO(b"not audio"), "a.wav")})
    assert response.status_code == 400 and response.get_json()["code"] == "invalid_audio"


def test_environment_variables_configure_the_app(monkeypatch, tmp_path: Path, engine: FakeEngine) -> None:
    monkeypatch.setenv("WHISPER_FLASK_MAX_WORKERS", "3")
    monkeypatch.setenv("WHISPER_FLASK_KEEP_UPLOADS", "true")
    config = base_config(tmp_path)
    del config["TESTING"]
    app = create_app(config, engine=engine)
    try:
        assert (app.config["MAX_WORKERS"], app.config["KEEP_UPLOADS"]) == (3, True)
    finally:
        get_service(app).stop()


@pytest.mark.parametrize(("proxies", "logged"), [(0, "from 127.0.0.1"), (1, "from 203.0.113.9")])
def test_forwarded_client_address_is_trusted_only_with_proxy_fix(make_app, caplog, proxies: int, logged: str) -> None:
    client = make_app(PROXY_FIX=proxies).test_client()
    response = client.post(
        "/upload",
        data={"file": (io.BytesIO(wav_bytes(1)), "a.wav")},
        headers={"X-Forwarded-For": "203.0.113.9"},
        environ_base={"REMOTE_ADDR": "127.0.0.1"},
    )
    assert response.status_code == 202
    assert logged in caplog.text


def test_signed_links_carry_the_prefix_a_trusted_proxy_names(make_app) -> None:
    client = make_app(PROXY_FIX=1).test_client()
    headers = {"X-Forwarded-Prefix": "/stt"}
    response = client.post("/upload", data={"file": (io.BytesIO(wav_bytes(1)), "a.wav")}, headers=headers)
    link = response.get_json()["download_url"]
    assert link.startswith(f"/stt/download/{response.get_json()['transcription_id']}.txt?expires="), link
    wait_for(client, response.get_json()["transcription_id"], "completed")
    assert client.get(link.removeprefix("/stt")).status_code == 200
