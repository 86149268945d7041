"""Restart recovery, graceful stop and the service's lifecycle, in process on the fake engine."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Connection

from tests.helpers import (
    FakeEngine,
    base_config,
    create_key,
    eventually,
    keyed_client_class,
    sqlite_store,
    wait_for,
    wav_bytes,
)
from whisper_flask import create_app
from whisper_flask.engine.options import TranscribeOptions
from whisper_flask.exceptions import StorageFull, WhisperIncompatible
from whisper_flask.extension import get_service
from whisper_flask.jobs.ports import Fence
from whisper_flask.jobs.records import Job, JobStage, JobStatus
from whisper_flask.jobs.store import SqlJobStore


def seed_store(tmp_path: Path, jobs: list[tuple[str, JobStatus, JobStage, int]]) -> None:
    """Leave jobs in the store as a killed process would, each with an upload on disk."""
    (tmp_path / "transcripts").mkdir()
    (tmp_path / "uploads").mkdir()
    store = sqlite_store(tmp_path / "transcripts" / "jobs.sqlite3")
    for job_id, status, stage, attempts in jobs:
        (tmp_path / "uploads" / f"{job_id}.upload").write_bytes(wav_bytes(2))
        job = Job(
            id=job_id,
            filename=f"{job_id}.wav",
            upload_name=f"{job_id}.upload",
            options=TranscribeOptions(),
            model="fake",
        )
        store.insert(job)
        store.update(dataclasses.replace(job, status=status, stage=stage, attempts=attempts))
    store.close()


@pytest.fixture
def restarted(tmp_path: Path, engine: FakeEngine) -> Iterator[Callable[..., FlaskClient]]:
    """Start a service on a seeded store and give an admin client (jobs from before keys belong to no key)."""
    apps = []

    def restart(**config: Any) -> FlaskClient:
        app = create_app({**base_config(tmp_path), **config}, engine=engine)
        app.test_client_class = keyed_client_class(create_key(tmp_path, "root", admin=True))
        apps.append(app)
        return app.test_client()  # its first request starts the service, which queues the left jobs again

    yield restart
    for app in apps:
        get_service(app).stop()


@pytest.mark.parametrize("innocent_stage", [JobStage.FETCHING, JobStage.DECODING_AUDIO, JobStage.WAITING_FOR_STORAGE])
def test_a_crash_is_charged_to_the_one_job_past_decoding_which_fails_at_the_limit(
    tmp_path: Path, restarted: Callable[..., FlaskClient], innocent_stage: JobStage
) -> None:
    a, b, c = "a" * 32, "b" * 32, "c" * 32
    seed_store(
        tmp_path,
        [
            (a, JobStatus.IN_PROGRESS, innocent_stage, 1),  # no model step yet, ffmpeg runs apart: innocent
            (b, JobStatus.IN_PROGRESS, JobStage.TRANSCRIBING, 2),
            (c, JobStatus.PENDING, JobStage.QUEUED, 0),
        ],
    )
    client = restarted(MAX_WORKERS=1)
    crashed = wait_for(client, b, "failed")
    assert (crashed["error_code"], crashed["attempts"]) == ("interrupted", 2)
    assert not (tmp_path / "uploads" / f"{b}.upload").exists(), "a failed job's upload goes when it fails"
    records = {job_id: wait_for(client, job_id, "completed") for job_id in (a, c)}
    assert records[a]["attempts"] == 1 and records[c]["attempts"] == 1, "the innocent job was not charged"
    assert records[a]["started_at"] < records[c]["started_at"], "submission order is kept"


def test_a_crash_beside_other_jobs_charges_none_and_each_runs_alone_afterwards(
    tmp_path: Path, restarted: Callable[..., FlaskClient]
) -> None:
    a, b, c = "a" * 32, "b" * 32, "c" * 32
    seed_store(
        tmp_path,
        [
            (a, JobStatus.IN_PROGRESS, JobStage.TRANSCRIBING, 1),
            (b, JobStatus.IN_PROGRESS, JobStage.WRITING, 2),
            (c, JobStatus.PENDING, JobStage.QUEUED, 0),
        ],
    )
    client = restarted(MAX_WORKERS=3)
    records = {job_id: wait_for(client, job_id, "completed", "failed") for job_id in (a, b, c)}
    assert [records[job_id]["status"] for job_id in (a, b, c)] == ["completed"] * 3
    assert [records[job_id]["attempts"] for job_id in (a, b, c)] == [1, 2, 1]
    runs = sorted((r["started_at"], r["finished_at"]) for r in records.values())
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(runs)), (
        f"the suspects ran beside another job: {runs}"
    )


def test_graceful_stop_puts_the_running_job_back_without_counting_an_attempt(
    tmp_path: Path, engine: FakeEngine
) -> None:
    app = create_app({**base_config(tmp_path), "MAX_WORKERS": 1}, engine=engine)
    key = create_key(tmp_path, "alice")
    app.test_client_class = keyed_client_class(key)
    client = app.test_client()
    engine.gate.clear()
    ids = [
        client.post("/upload", data={"file": (io.BytesIO(wav_bytes(70)), "a.wav")}).get_json()["transcription_id"]
        for _ in range(2)
    ]
    assert engine.in_window.wait(10)
    stopping = threading.Thread(target=get_service(app).stop)
    stopping.start()
    eventually(  # 400 no_file until it stops taking work
        lambda: client.post("/upload", data={}).status_code == 503, timeout=30, message="the service kept taking work"
    )
    engine.gate.set()  # the running window finishes; the next one sees the stop
    stopping.join(30)
    assert not stopping.is_alive(), "the service did not stop within 30 s"
    db = sqlite3.connect(tmp_path / "transcripts" / "jobs.sqlite3")
    rows = db.execute("SELECT id, status, attempts FROM jobs ORDER BY seq").fetchall()
    assert rows == [(ids[0], "pending", 0), (ids[1], "pending", 0)]
    assert len(list((tmp_path / "uploads").iterdir())) == 2, "pending jobs keep their audio"

    restarted = create_app({**base_config(tmp_path), "MAX_WORKERS": 1}, engine=engine)
    restarted.test_client_class = keyed_client_class(key)
    get_service(restarted).start()
    try:
        for job_id in ids:
            assert wait_for(restarted.test_client(), job_id, "completed")["status"] == "completed"
        resume = engine.resumed_from[1]
        assert resume is not None and resume.seek == 3000, "the stopped job resumes at the window it stopped at"
        assert engine.resumed_from[2] is None, "a job that never started has nothing to resume"
        # Removed with the upload, just after the registry records the job's end.
        eventually(lambda: not list((tmp_path / "transcripts").glob("*.resume.json")), timeout=10)
    finally:
        get_service(restarted).stop()


def test_uploads_are_refused_while_stopping(app, client) -> None:
    get_service(app).stop()
    response = client.post("/upload", data={"file": (io.BytesIO(wav_bytes(1)), "a.wav")})
    assert response.status_code == 503 and response.get_json()["code"] == "shutting_down"


def test_building_the_app_starts_nothing(tmp_path: Path, engine: FakeEngine) -> None:
    """A CLI command builds the app too: no model, no pool, no job taken from the store."""
    seed_store(tmp_path, [("a" * 32, JobStatus.PENDING, JobStage.QUEUED, 0)])
    key = create_key(tmp_path, "root", admin=True)
    before = set(threading.enumerate())
    app = create_app({**base_config(tmp_path), "MAX_WORKERS": 1}, engine=engine)
    app.test_client_class = keyed_client_class(key)
    try:
        assert not engine.loaded and engine.options == []
        assert set(threading.enumerate()) <= before, "a thread of an earlier test may end meanwhile, none may start"
        assert wait_for(app.test_client(), "a" * 32, "completed")["attempts"] == 1, "the first request starts it"
    finally:
        get_service(app).stop()


def test_stop_ends_every_thread_the_service_started(make_app, engine: FakeEngine) -> None:
    before = set(threading.enumerate())
    app = make_app(MAX_WORKERS=2)
    client = app.test_client()
    upload = client.post("/upload", data={"file": (io.BytesIO(wav_bytes(1)), "a.wav")})
    wait_for(client, upload.get_json()["transcription_id"], "completed")
    assert {t.name for t in set(threading.enumerate()) - before} >= {"whisper-sweep", "whisper-job_0"}
    get_service(app).stop()
    assert set(threading.enumerate()) - before == set()
    assert client.post("/upload", data={}).get_json()["code"] == "shutting_down", "a stopped service stays stopped"


def test_an_incompatible_whisper_refuses_to_start(tmp_path: Path, engine: FakeEngine, monkeypatch) -> None:
    import whisper

    monkeypatch.delattr(whisper, "_ALIGNMENT_HEADS")
    with pytest.raises(
        WhisperIncompatible, match=r"does not have what this service relies on: whisper\._ALIGNMENT_HEADS"
    ):
        create_app(base_config(tmp_path), engine=engine)


def test_a_recovery_the_store_refuses_part_way_changes_no_record_and_a_later_start_judges_the_same(
    tmp_path: Path, restarted: Callable[..., FlaskClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = "a" * 32, "b" * 32
    seed_store(tmp_path, [(a, JobStatus.IN_PROGRESS, JobStage.TRANSCRIBING, 1),
                          (b, JobStatus.IN_PROGRESS, JobStage.TRANSCRIBING, 1)])  # fmt: skip
    write = SqlJobStore._write

    def refuse_the_second(store: SqlJobStore, connection: Connection, job: Job, fence: Fence | None) -> None:
        if job.id == b:
            raise StorageFull("database or disk is full")
        write(store, connection, job, fence)

    monkeypatch.setattr(SqlJobStore, "_write", refuse_the_second)
    failing = get_service(create_app(base_config(tmp_path), engine=FakeEngine()))
    with pytest.raises(StorageFull):
        failing.start()
    failing.stop()
    store = sqlite_store(tmp_path / "transcripts" / "jobs.sqlite3")
    left = [store.get(job_id) for job_id in (a, b)]
    store.close()
    assert [(job.status, job.attempts, job.isolated) for job in left if job] == [(JobStatus.IN_PROGRESS, 1, False)] * 2
    monkeypatch.setattr(SqlJobStore, "_write", write)
    client = restarted()  # two suspects: neither is charged, each runs isolated
    assert [wait_for(client, job_id)["attempts"] for job_id in (a, b)] == [1, 1]


def test_a_database_with_a_column_no_field_reads_any_more_still_loads_its_jobs(tmp_path: Path) -> None:
    seed_store(tmp_path, [("a" * 32, JobStatus.PENDING, JobStage.QUEUED, 0)])
    database = tmp_path / "transcripts" / "jobs.sqlite3"
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        db.execute("ALTER TABLE jobs ADD COLUMN link_base")  # written by an older version
        db.execute("UPDATE jobs SET link_base = 'http://old.example'")
    store = sqlite_store(database)
    job = store.get("a" * 32)
    store.close()
    assert job is not None and job.status is JobStatus.PENDING
