"""The job database (jobs/database.py, store.py, access/keys.py, migrations/): one contract on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask import Flask
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import OperationalError

from tests.helpers import submit, wait_for
from tests.servers import ROOT, Postgres, free_port
from whisper_flask.access.keys import KeyStore
from whisper_flask.engine.options import Chunking, Task, TranscribeOptions
from whisper_flask.exceptions import ApiKeyError, DatabaseUnavailable, StorageFull
from whisper_flask.extension import get_service
from whisper_flask.jobs.database import open_engine, storage_errors
from whisper_flask.jobs.ports import Fence
from whisper_flask.jobs.records import DeliveryState, Job, JobStage, JobStatus, NotificationKind, ended
from whisper_flask.jobs.schema import metadata
from whisper_flask.jobs.store import SqlJobStore


@pytest.fixture
def store(database_url: str) -> Iterator[SqlJobStore]:
    """A job store on an empty database of the test's backend; closed after the test."""
    opened = SqlJobStore(open_engine(database_url))
    yield opened
    opened.close()


def new_job(n: int = 0, **fields: object) -> Job:
    """A pending job with a distinct id."""
    return dataclasses.replace(
        Job(id=f"{n:032x}", filename=f"{n}.wav", upload_name=f"{n}.upload", options=TranscribeOptions(), model="m"),
        **fields,
    )


def stored(store: SqlJobStore, job: Job) -> Job:
    """The job as inserted, with its sequence number."""
    return dataclasses.replace(job, seq=store.insert(job))


def test_every_field_of_a_job_round_trips(store: SqlJobStore) -> None:
    options = TranscribeOptions(
        language="de", task=Task.TRANSLATE, initial_prompt="Grüße, \"quoted\" 'text'", word_timestamps=True,
        temperature=0.2, beam_size=5, diarize=True, min_speakers=1, max_speakers=3, known_speakers=("ann", "bob"),
        chunking_strategy=Chunking(threshold=0.3),
    )  # fmt: skip
    job = stored(store, new_job(1, options=options, owner="alice", callback_url="https://hooks.example/x"))
    assert job.seq > 0 and store.get(job.id) == job, "defaults: None, 0.0, False and the pending enums"
    changed = dataclasses.replace(
        job, status=JobStatus.IN_PROGRESS, stage=JobStage.DIARIZING, progress=0.1 + 0.2, stage_progress=33.25,
        duration=3601.125, processed_seconds=1e-9, eta_seconds=12.5, language="de", error="a message\nwith lines",
        error_code="storage_full", started_at="2026-01-02T03:04:05.678+00:00", attempts=2, isolated=True,
        source_url="https://audio.example/a.mp3", notify_email="ann@example.org",
    )  # fmt: skip
    store.update(changed)
    assert store.get(job.id) == changed, "floats exactly, booleans as booleans, enums as enums"
    cleared = dataclasses.replace(changed, stage_progress=None, eta_seconds=None, error=None, isolated=False)
    store.update(cleared)
    assert store.get(job.id) == cleared
    assert store.get("f" * 32) is None
    assert stored(store, new_job(2)).seq > job.seq, "sequence numbers are submission order"


def test_update_all_stores_every_job_or_none(store: SqlJobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = stored(store, new_job(1, callback_url="https://h.example/a")), stored(store, new_job(2))
    write = SqlJobStore._write

    def refuse_b(self: SqlJobStore, connection: Connection, job: Job, fence: Fence | None) -> None:
        if job.id == b.id:
            raise StorageFull("refused")
        write(self, connection, job, fence)  # a's row and its notification are sent before b fails

    monkeypatch.setattr(SqlJobStore, "_write", refuse_b)
    with pytest.raises(StorageFull):
        store.update_all([ended(a, JobStatus.COMPLETED, None, None), ended(b, JobStatus.COMPLETED, None, None)])
    assert [store.get(job.id) for job in (a, b)] == [a, b]
    assert store.notifications(a.id) == []
    monkeypatch.undo()
    store.update_all([ended(a, JobStatus.FAILED, "x", "y"), ended(b, JobStatus.CANCELLED, None, None)])
    assert [store.get(job.id).status for job in (a, b)] == [JobStatus.FAILED, JobStatus.CANCELLED]  # type: ignore[union-attr]


def test_an_ended_job_s_notifications_are_written_with_its_end_and_once(store: SqlJobStore) -> None:
    job = stored(store, new_job(1, owner="k", callback_url="https://h.example/x", notify_email="a@example.org"))
    store.update(dataclasses.replace(job, status=JobStatus.IN_PROGRESS))
    assert store.notifications(job.id) == [], "only an end is announced"
    done = ended(job, JobStatus.COMPLETED, None, None)
    store.update(done)
    store.update_all([done, done])  # written again (a retried end, the crash rule): still once each
    notes = store.notifications(job.id)
    assert [(n.kind, n.target, n.state, n.attempts) for n in notes] == [
        (NotificationKind.WEBHOOK, "https://h.example/x", DeliveryState.PENDING, 0),
        (NotificationKind.EMAIL, "a@example.org", DeliveryState.PENDING, 0),
    ]
    plain = stored(store, new_job(2))
    store.update(ended(plain, JobStatus.COMPLETED, None, None))
    assert store.notifications(plain.id) == []


def test_due_notifications_offer_each_key_s_soonest_and_attempts_are_recorded(store: SqlJobStore) -> None:
    for n, owner in enumerate(["a", "a", "a", "b", None]):
        job = stored(store, new_job(n, owner=owner, callback_url=f"https://h.example/{n}"))
        store.update(ended(job, JobStatus.COMPLETED, None, None))
    due = store.due_notifications("9999", limit=10)
    assert sorted((n.owner or "-", n.job_id) for n in due) == [("-", f"{4:032x}"), ("a", f"{0:032x}"),
                                                               ("b", f"{3:032x}")]  # fmt: skip
    assert [n.next_attempt_at for n in due] == sorted(n.next_attempt_at for n in due), "soonest first"
    assert len(store.due_notifications("9999", limit=1)) == 1
    assert store.due_notifications("0000", limit=10) == [], "none is due before its time"
    first = next(n for n in due if n.owner == "a")
    store.record_attempt(dataclasses.replace(first, attempts=1, next_attempt_at="9998", last_error="refused"))
    assert [n.job_id for n in store.due_notifications("9999", 10) if n.owner == "a"] == [f"{1:032x}"], "a's next"
    store.record_attempt(
        dataclasses.replace(first, state=DeliveryState.DELIVERED, attempts=2, last_error="refused", delivered_at="x")
    )
    (again,) = [n for n in store.notifications(first.job_id)]
    assert (again.state, again.attempts, again.last_error, again.delivered_at) == (
        DeliveryState.DELIVERED, 2, "refused", "x",
    )  # fmt: skip


def test_listing_filters_by_status_and_owner_newest_first(store: SqlJobStore) -> None:
    jobs = [stored(store, new_job(n, owner=["a", "b"][n % 2])) for n in range(6)]
    for job in jobs[:2]:
        store.update(ended(job, JobStatus.COMPLETED, None, None))
    newest_first = [job.id for job in reversed(jobs)]
    assert [job.id for job in store.list_jobs(None, None, 100, 0)] == newest_first
    assert [job.id for job in store.list_jobs(None, None, 2, 1)] == newest_first[1:3]
    assert [job.id for job in store.list_jobs(None, "a", 100, 0)] == [jobs[4].id, jobs[2].id, jobs[0].id]
    assert [job.id for job in store.list_jobs(JobStatus.COMPLETED, None, 100, 0)] == [jobs[1].id, jobs[0].id]
    assert [job.id for job in store.list_jobs(JobStatus.PENDING, "b", 100, 0)] == [jobs[5].id, jobs[3].id]
    assert store.list_jobs(JobStatus.FAILED, "a", 100, 0) == []
    assert store.jobs_per_owner() == {"a": 3, "b": 3}
    assert [job.id for job in store.unfinished()] == [job.id for job in jobs[2:]], "oldest first"


def test_owner_answers_one_row_whatever_the_id(store: SqlJobStore) -> None:
    mine, nobody_s = stored(store, new_job(1, owner="alice")), stored(store, new_job(2))
    assert store.owner(mine.id) == (True, "alice")
    assert store.owner(nobody_s.id) == (True, None)
    assert store.owner("f" * 32) == (False, None)


def test_ended_jobs_expire_and_are_forgotten_with_their_notifications(store: SqlJobStore) -> None:
    old = stored(store, new_job(1, callback_url="https://h.example/x"))
    recent, running = stored(store, new_job(2)), stored(store, new_job(3))
    store.update(
        dataclasses.replace(ended(old, JobStatus.COMPLETED, None, None), finished_at="2026-01-01T00:00:00.000+00:00")
    )
    store.update(
        dataclasses.replace(ended(recent, JobStatus.FAILED, "x", "y"), finished_at="2026-03-01T00:00:00.000+00:00")
    )
    store.update(dataclasses.replace(running, status=JobStatus.IN_PROGRESS))
    assert [job.id for job in store.finished_before("2026-02-01T00:00:00.000+00:00")] == [old.id]
    store.mark_expired(old.id, "2026-02-01T00:00:00.000+00:00")
    assert store.finished_before("2026-02-01T00:00:00.000+00:00") == []
    assert store.forget_expired_before("2026-01-15T00:00:00.000+00:00") == 0
    assert store.forget_expired_before("2026-02-15T00:00:00.000+00:00") == 1
    assert store.get(old.id) is None and store.notifications(old.id) == []
    assert {job.id for job in store.list_jobs(None, None, 10, 0)} == {recent.id, running.id}


def test_a_forgotten_job_s_sequence_number_is_never_given_again(store: SqlJobStore) -> None:
    first, newest = stored(store, new_job(1)), stored(store, new_job(2))
    store.mark_expired(newest.id, "2026-01-01T00:00:00.000+00:00")
    assert store.forget_expired_before("2026-02-01T00:00:00.000+00:00") == 1
    assert stored(store, new_job(3)).seq > newest.seq > first.seq


def test_keys_are_created_authenticated_and_revoked(store: SqlJobStore) -> None:
    keys = KeyStore(store.engine)
    assert not keys.any_active() and keys.keys() == []
    secret = keys.create("alice", admin=False)
    admin_secret = keys.create("root", admin=True)
    with pytest.raises(ApiKeyError, match="exists already"):
        keys.create("alice", admin=True)
    with pytest.raises(ApiKeyError, match="a key name is"):
        keys.create("no spaces", admin=False)
    alice = keys.authenticate(secret)
    assert alice is not None and (alice.name, alice.admin) == ("alice", False)
    root = keys.authenticate(admin_secret)
    assert root is not None and root.admin
    assert keys.authenticate(secret + "x") is None and keys.authenticate("") is None
    used = {key.name: key.last_used_at for key in keys.keys()}
    assert used["alice"] is not None, "the first use is recorded"
    assert keys.authenticate(secret) is not None
    assert {key.name: key.last_used_at for key in keys.keys()} == used, "again within a minute: not rewritten"
    keys.revoke("alice")
    assert keys.authenticate(secret) is None and not keys.is_active("alice") and keys.is_active("root")
    with pytest.raises(ApiKeyError, match="no active key"):
        keys.revoke("alice")
    assert [(key.name, key.revoked_at is not None) for key in keys.keys()] == [("alice", True), ("root", False)]
    assert keys.any_active()
    with store.engine.connect() as connection:
        digests = connection.execute(text("SELECT digest FROM api_keys")).scalars().all()
    assert secret not in digests and len(digests) == 2, "only hashes are stored"


def schema_differences(engine: Engine) -> list[object]:
    """What the migrated database lacks or has beyond schema.py's tables (Alembic's comparison)."""
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), metadata)
    return [
        d
        for d in differences
        if not (isinstance(d, tuple) and d[0] == "remove_table" and d[1].name == "alembic_version")
    ]


def test_migrations_make_schema_py_s_tables_and_opening_again_changes_nothing(database_url: str) -> None:
    first = open_engine(database_url)
    store = SqlJobStore(first)
    job = stored(store, new_job(1))
    second = open_engine(database_url)  # a restart, or a second node
    try:
        assert schema_differences(second) == []
        with second.connect() as connection:
            assert connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == ["0001"]
        assert SqlJobStore(second).get(job.id) == job
    finally:
        second.dispose()
        store.close()


def test_nodes_starting_together_migrate_one_after_another(postgres: Postgres) -> None:
    postgres.reset()
    # Processes, as nodes are: Alembic's context is global to a process (open_engine serialises its threads).
    opening = "import sys; from whisper_flask.jobs.database import open_engine; open_engine(sys.argv[1]).dispose()"
    nodes = [
        subprocess.Popen([sys.executable, "-c", opening, postgres.url], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    for node in nodes:
        _, errors = node.communicate(timeout=120)
        assert node.returncode == 0, errors
    engine = open_engine(postgres.url)
    try:
        assert schema_differences(engine) == []
    finally:
        engine.dispose()


#: jobs.sqlite3 as the versions before migrations left it: tables made by hand, later fields added by
#: ALTER TABLE without a type, a column no field reads any more, no alembic_version.
OLD_DATABASE = [
    "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id, filename, upload_name, options, model, created_at,"
    " status, stage, progress, duration, processed_seconds, eta_seconds, language, error, error_code, started_at,"
    " finished_at, attempts, expired_at, UNIQUE (id))",
    "CREATE INDEX jobs_status ON jobs (status, seq)",
    "ALTER TABLE jobs ADD COLUMN owner",
    "ALTER TABLE jobs ADD COLUMN link_base",
    "ALTER TABLE jobs ADD COLUMN isolated",
    "CREATE INDEX jobs_owner ON jobs (owner, seq)",
    "CREATE TABLE api_keys (name TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE, admin INTEGER NOT NULL,"
    " created_at TEXT NOT NULL, last_used_at TEXT, revoked_at TEXT)",
]


def test_a_database_from_before_migrations_is_adopted_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    old_job = new_job(7, owner="alice", progress=12.5, attempts=1)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        for statement in OLD_DATABASE:
            db.execute(statement)
        db.execute(
            "INSERT INTO jobs (id, filename, upload_name, options, model, created_at, status, stage, progress,"
            " processed_seconds, attempts, owner, link_base) VALUES (?, ?, ?, '{}', ?, ?, ?, ?, ?, 0.0, ?, ?, ?)",
            (old_job.id, old_job.filename, old_job.upload_name, old_job.model, old_job.created_at,
             old_job.status.value, old_job.stage.value, old_job.progress, old_job.attempts, old_job.owner,
             "http://old.example"),
        )  # fmt: skip
    keys = KeyStore(open_engine(path))  # a key made by the old version's table
    secret = keys.create("alice", admin=False)
    store = SqlJobStore(keys.engine)
    try:
        assert store.get(old_job.id) == dataclasses.replace(old_job, seq=1), "NULL isolated reads as False"
        done = ended(store.get(old_job.id) or old_job, JobStatus.COMPLETED, None, None)
        store.update(dataclasses.replace(done, callback_url="https://h.example/x", isolated=True))
        assert [n.kind for n in store.notifications(old_job.id)] == [NotificationKind.WEBHOOK], "a table made for it"
        assert stored(store, new_job(8)).seq == 2
        assert keys.authenticate(secret) is not None
        columns = {column["name"] for column in inspect(store.engine).get_columns("jobs")}
        assert {"callback_url", "notify_email", "stage_progress", "lease_owner", "lease_until", "link_base"} <= columns
    finally:
        store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0001",)]
        assert db.execute("SELECT link_base FROM jobs WHERE seq = 1").fetchone() == ("http://old.example",)
    reopened = SqlJobStore(open_engine(path))  # adopted once: now an ordinary migrated database
    try:
        assert reopened.get(old_job.id) is not None and reopened.get(old_job.id).isolated  # type: ignore[union-attr]
    finally:
        reopened.close()


def test_a_restarted_postgresql_is_reconnected_to_by_the_next_call(postgres: Postgres) -> None:
    postgres.reset()
    store = SqlJobStore(open_engine(postgres.url))
    try:
        job = stored(store, new_job(1))
        assert store.get(job.id) == job  # a pooled connection, which the restart cuts
        postgres.stop()
        postgres.start()
        assert store.get(job.id) == job
        store.update(dataclasses.replace(job, progress=50.0))
        assert store.get(job.id).progress == 50.0  # type: ignore[union-attr]
    finally:
        store.close()


def test_a_full_postgresql_disk_is_storage_full_and_a_lost_connection_is_database_unavailable() -> None:
    class DiskFull(Exception):
        sqlstate = "53100"

    with pytest.raises(StorageFull), storage_errors(None):
        raise OperationalError("INSERT ...", {}, DiskFull("could not extend file: No space left on device"))
    with pytest.raises(DatabaseUnavailable), storage_errors(None):
        raise OperationalError("INSERT ...", {}, Exception("server closed the connection unexpectedly"))


def test_a_database_url_s_password_is_never_told(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(DatabaseUnavailable) as refused:
        open_engine(f"postgres://whisper:s3cret-pw@127.0.0.1:{free_port()}/whisper")
    assert "s3cret-pw" not in str(refused.value) and "s3cret-pw" not in str(refused.value.__cause__)
    assert "s3cret-pw" not in caplog.text


def test_the_service_keeps_its_jobs_and_keys_in_database_url_s_postgresql(
    postgres: Postgres, make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    postgres.reset()
    app = make_app(DATABASE_URL=postgres.url)
    client = app.test_client()
    job_id = submit(client)
    assert wait_for(client, job_id)["status"] == "completed"
    store = get_service(app).parts.store  # type: ignore[attr-defined]
    assert store.engine.dialect.name == "postgresql" and store.get(job_id).status is JobStatus.COMPLETED
    assert not (tmp_path / "transcripts" / "jobs.sqlite3").exists(), "no SQLite beside it"
