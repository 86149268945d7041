"""A full disk (ARCHITECTURE.md, "Durability"): a real tmpfs as TRANSCRIPT_DIR, filled while a job runs."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask

from tests.helpers import FakeEngine, eventually, keyed, submit, upload, wait_for, wait_until, wav_bytes
from whisper_flask.engine.options import TranscribeOptions
from whisper_flask.exceptions import StorageFull
from whisper_flask.extension import get_service
from whisper_flask.jobs.database import open_engine, storage_errors
from whisper_flask.jobs.records import Job, JobStatus
from whisper_flask.jobs.registry import JobRegistry
from whisper_flask.jobs.store import SqlJobStore


def mount_small(mountpoint: Path) -> Iterator[Path]:
    """`mountpoint` on a real 8 MiB tmpfs of its own; skipped where mounting is not allowed."""
    mountpoint.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mountpoint)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except FileNotFoundError:
        pytest.skip("no mount command: a full disk needs a filesystem of its own")
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here (root with CAP_SYS_ADMIN is): {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:  # the apps are stopped first (make_app is set up after this fixture): nothing holds it
        if subprocess.run(["umount", str(mountpoint)], timeout=30).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mountpoint)], timeout=30, check=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """TRANSCRIPT_DIR (tmp_path/transcripts) on a small disk of its own."""
    yield from mount_small(tmp_path / "transcripts")


@pytest.fixture
def small_upload_disk(tmp_path: Path) -> Iterator[Path]:
    """UPLOAD_DIR (tmp_path/uploads), where audio is decoded, on a small disk of its own."""
    yield from mount_small(tmp_path / "uploads")


def fill(directory: Path) -> Path:
    """A file that takes every free byte of the directory's filesystem; deleting it gives the space back."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (b"\0" * (1 << 20), b"\0" * 4096, b"\0"):  # to the last byte
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def full_disk_app(small_disk: Path, make_app: Callable[..., Flask]) -> Flask:
    """A started app, one worker, whose TRANSCRIPT_DIR (and so jobs.sqlite3) is the small disk."""
    return make_app(MAX_WORKERS=1)


def test_a_job_on_a_full_disk_waits_visibly_and_completes_once_space_returns(
    full_disk_app: Flask, small_disk: Path, engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    client, store = full_disk_app.test_client(), get_service(full_disk_app).parts.store
    engine.gate.clear()
    job_id = submit(client, wav_bytes(90))  # three windows
    assert engine.in_window.wait(10)
    filler = fill(small_disk)
    engine.gate.set()
    # Its resume state, progress and transcript cannot be written, nor its record: it waits, and says so.
    waiting = wait_until(client, job_id, lambda record: record["stage"] == "waiting_for_storage", timeout=30)
    assert waiting["status"] == "in_progress"
    assert (
        client.get("/queue").get_json().items()
        >= {"pending": 0, "in_progress": 1, "capacity": 100, "workers": 1}.items()
    )
    stored = store.get(job_id)
    assert stored is not None and stored.status is JobStatus.IN_PROGRESS, "memory and store agree"
    logged = [r.getMessage() for r in caplog.records if "waits until its write is stored" in r.getMessage()]
    assert len(logged) == 1 and job_id in logged[0]

    filler.unlink()
    done = wait_for(client, job_id, timeout=30)  # no restart: the pipeline tries again
    assert (done["status"], done["error_code"], done["attempts"]) == ("completed", None, 1)
    assert client.get(f"/download/{job_id}.txt").get_data(as_text=True).split() == ["window", "0", "window", "1",
                                                                                      "window", "2"]  # fmt: skip
    fresh = submit(client)
    assert wait_for(client, fresh, timeout=30)["status"] == "completed"
    assert (
        client.get("/queue").get_json().items()
        >= {"pending": 0, "in_progress": 0, "capacity": 100, "workers": 1}.items()
    )
    assert store.unfinished() == []


def test_uploads_and_cancels_on_a_full_disk_answer_507_and_change_nothing(
    full_disk_app: Flask, small_disk: Path, engine: FakeEngine
) -> None:
    client, store = full_disk_app.test_client(), get_service(full_disk_app).parts.store
    engine.gate.clear()
    job_id = submit(client)
    assert engine.in_window.wait(10)
    filler = fill(small_disk)
    response = upload(client)
    assert (response.status_code, response.get_json()["code"]) == (507, "storage_full")
    response = client.delete(f"/jobs/{job_id}")
    assert (response.status_code, response.get_json()["code"]) == (507, "storage_full")
    # The refused cancel left the job running, in memory as in the store.
    assert client.get(f"/progress/{job_id}").get_json()["status"] == "in_progress"
    assert (
        client.get("/queue").get_json().items()
        >= {"pending": 0, "in_progress": 1, "capacity": 100, "workers": 1}.items()
    )
    assert [job.id for job in store.unfinished()] == [job_id]
    filler.unlink()
    response = client.delete(f"/jobs/{job_id}")
    assert (response.status_code, response.get_json()["status"]) == (200, "cancelled")
    assert client.get("/queue").get_json()["in_progress"] == 0


def test_a_key_first_used_on_a_full_disk_is_accepted_and_the_failed_bookkeeping_logged_once(
    full_disk_app: Flask, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = submit(full_disk_app.test_client())
    assert wait_for(full_disk_app.test_client(), job_id, timeout=30)["status"] == "completed"
    fresh = [keyed(full_disk_app, name, admin=True) for name in ("first", "second")]  # never used yet
    fill(small_disk)
    for client in fresh:  # each one's first use would record its last_used_at
        response = client.get(f"/progress/{job_id}")
        assert (response.status_code, response.get_json()["status"]) == (200, "completed")
    warnings = [r for r in caplog.records if "last used" in r.getMessage() and r.levelno == logging.WARNING]
    assert len(warnings) == 1


class RefusingStore(SqlJobStore):
    """A job store whose updates fail as on a full disk while `full` is set."""

    full = False

    def update(self, job: Job) -> None:
        if self.full:
            raise StorageFull("the job database cannot be written: database or disk is full")
        super().update(job)


@pytest.mark.parametrize("end", ["finish", "cancel"])
def test_the_registry_keeps_a_job_whose_end_the_store_refuses(tmp_path: Path, end: str) -> None:
    store = RefusingStore(open_engine(tmp_path / "jobs.sqlite3"))
    registry = JobRegistry(store, capacity=10, per_owner=10)
    registry.open()
    job = Job(id="a" * 32, filename="a.wav", upload_name="a.upload", options=TranscribeOptions(), model="fake")
    registry.add(job)
    assert registry.start_next() is not None
    store.full = True
    with pytest.raises(StorageFull):
        if end == "finish":
            registry.finish(job.id, JobStatus.COMPLETED)
        else:
            registry.cancel(job.id)
    assert registry.view(job.id).job.status is JobStatus.IN_PROGRESS
    assert registry.counts().in_progress == 1
    with pytest.raises(StorageFull):  # nor does a refused change reach memory
        registry.update(job.id, progress=50.0)
    assert registry.view(job.id).job.progress == 0.0
    store.full = False
    registry.finish(job.id, JobStatus.COMPLETED)
    stored = store.get(job.id)
    assert stored is not None and stored.status is JobStatus.COMPLETED
    assert registry.counts().in_progress == 0
    store.close()


def test_a_job_whose_audio_cannot_be_decoded_for_a_full_upload_disk_waits_and_completes_once_space_returns(
    small_upload_disk: Path, make_app: Callable[..., Flask], engine: FakeEngine
) -> None:
    client = make_app(MAX_WORKERS=1).test_client()
    engine.gate.clear()
    first = submit(client, wav_bytes(1))
    assert engine.in_window.wait(10)
    second = submit(client, wav_bytes(30))  # pending; its decoded audio (960 kB) will find no room
    filler = fill(small_upload_disk)
    engine.gate.set()
    waiting = wait_until(client, second, lambda record: record["stage"] == "waiting_for_storage", timeout=30)
    assert (waiting["status"], waiting["error_code"]) == ("in_progress", None), "not failed as invalid audio"
    filler.unlink()
    assert wait_for(client, second, timeout=30)["status"] == "completed"
    assert wait_for(client, first, timeout=30)["status"] == "completed"


def test_a_job_whose_end_the_store_refuses_for_another_reason_leaves_no_place_held_in_memory(
    make_app: Callable[..., Flask], engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(MAX_WORKERS=1)
    client, update = app.test_client(), SqlJobStore.update

    def locked_at_the_end(store: SqlJobStore, job: Job) -> None:
        if job.status.terminal:
            raise sqlite3.OperationalError("database is locked")
        update(store, job)

    monkeypatch.setattr(SqlJobStore, "update", locked_at_the_end)
    abandoned = submit(client, wav_bytes(1))
    eventually(
        lambda: client.get("/queue").get_json()["in_progress"] == 0, timeout=30, message="the job holds its place"
    )
    monkeypatch.setattr(SqlJobStore, "update", update)
    assert wait_for(client, submit(client, wav_bytes(1)), timeout=30)["status"] == "completed"
    assert get_service(app).parts.store.get(abandoned).status is JobStatus.IN_PROGRESS, "left to the crash rule"


def sqlite_error(code: int) -> sqlite3.OperationalError:
    """An error as SQLite raises it, with its extended result code."""
    error = sqlite3.OperationalError("disk I/O error")
    error.sqlite_errorcode = code  # type: ignore[attr-defined]
    return error


@pytest.mark.parametrize(("code", "full_disk", "raised"), [
    (13, False, StorageFull),  # SQLITE_FULL
    (10 | (3 << 8), True, StorageFull),  # SQLITE_IOERR_WRITE on a full disk: ENOSPC under a WAL write
    (10 | (3 << 8), False, sqlite3.OperationalError),  # the same on a disk with room: a failing disk
])  # fmt: skip
def test_an_io_error_is_a_full_disk_only_where_the_disk_is_full(
    small_disk: Path, code: int, full_disk: bool, raised: type[Exception]
) -> None:
    if full_disk:
        fill(small_disk)
    with pytest.raises(raised):
        with storage_errors(small_disk / "jobs.sqlite3"):
            raise sqlite_error(code)
