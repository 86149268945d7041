"""Durable job records in SQLite (WAL), one row per job: the one-process JobStore (jobs/ports.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from whisper_flask.engine.options import TranscribeOptions
from whisper_flask.exceptions import StorageFull
from whisper_flask.files import FILE_MODE, create_private
from whisper_flask.jobs.records import DeliveryState, Job, JobStage, JobStatus, Notification, NotificationKind, utcnow

_FIELDS = [f.name for f in dataclasses.fields(Job) if f.name != "seq"]
#: SQLite's primary result codes SQLITE_FULL and SQLITE_IOERR (extended codes keep them in their low
#: byte; typeshed lacks the module's constants).
_SQLITE_FULL, _SQLITE_IOERR = 13, 10
#: Free space under which an I/O error is taken for a full disk (a WAL write can fail as IOERR on ENOSPC).
_NEARLY_FULL_BYTES = 1 << 20


@contextlib.contextmanager
def storage_errors(database: Path) -> Iterator[None]:
    """SQLite refusing a write for want of space raises StorageFull; other errors (a failing disk) pass."""
    try:
        yield
    except sqlite3.Error as exc:
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        if code == _SQLITE_FULL or (code == _SQLITE_IOERR and _nearly_full(database.parent)):
            raise StorageFull(f"the job database cannot be written: {exc}") from exc
        raise


def _nearly_full(directory: Path) -> bool:
    try:
        stats = os.statvfs(directory)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < _NEARLY_FULL_BYTES


def connect(path: Path) -> sqlite3.Connection:
    """Open jobs.sqlite3 the way both the job store and the key store need it."""
    # Made 0600 before SQLite opens it: SQLite gives -wal and -shm the database file's mode.
    create_private(path)
    for journal in (path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")):
        if journal.exists():  # left by an older version, made under the umask
            journal.chmod(FILE_MODE)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA busy_timeout = 5000")  # the other store writes to the same file
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # a 202 means the job survives a power cut
    return db


class SqliteJobStore:
    """Commits every write before returning; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        # One connection, serialised by a lock: writes are tiny, and one writer
        # is what SQLite allows anyway, so no "database is locked" retries.
        self._lock = threading.Lock()
        self._path = path
        with storage_errors(path):
            self._create(path)

    def _create(self, path: Path) -> None:
        self._db = connect(path)
        self._db.execute(
            f"CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, {', '.join(_FIELDS)},"
            " UNIQUE (id))"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq)")
        # A database from an older version lacks the newer fields' columns (they default to NULL).
        existing = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name in _FIELDS:
            if name not in existing:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name}")
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, seq)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS notifications (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL,"
            " kind TEXT NOT NULL, target TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL,"
            " next_attempt_at TEXT NOT NULL, last_error TEXT, delivered_at TEXT, UNIQUE (job_id, kind))"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS notifications_due ON notifications (state, next_attempt_at)")

    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        # The connection alone, and a full disk as StorageFull (507, and the pipeline waits for space).
        with self._lock, storage_errors(self._path):
            yield

    def insert(self, job: Job) -> int:
        """Store a new job and return its sequence number (submission order)."""
        with self._using():
            cursor = self._db.execute(
                f"INSERT INTO jobs ({', '.join(_FIELDS)}) VALUES ({', '.join('?' * len(_FIELDS))})",
                _values(job),
            )
        return int(cursor.lastrowid or 0)

    def update(self, job: Job) -> None:
        """Replace a job's stored record with this one; an ended job's notifications join the outbox with it."""
        self.update_all([job])

    def update_all(self, jobs: list[Job]) -> None:
        """Replace these jobs' records in one transaction: all of them are stored, or none."""
        with self._using():
            # One transaction: no crash can leave an ended job without its notifications, nor the
            # crash rule's verdicts half written (the next start would judge from half of them).
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for job in jobs:
                    self._write(job)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite rolls back by itself on some errors (a full disk)
                    self._db.execute("ROLLBACK")
                raise

    def _write(self, job: Job) -> None:
        # Caller holds the lock, in a transaction.
        self._db.execute(
            f"UPDATE jobs SET {', '.join(f'{name} = ?' for name in _FIELDS)} WHERE id = ?", [*_values(job), job.id]
        )
        if job.status.terminal:
            for kind, target in ((NotificationKind.WEBHOOK, job.callback_url),
                                 (NotificationKind.EMAIL, job.notify_email)):  # fmt: skip
                if target:
                    self._db.execute(
                        "INSERT OR IGNORE INTO notifications (job_id, kind, target, state, attempts,"
                        " next_attempt_at) VALUES (?, ?, ?, ?, 0, ?)",
                        (job.id, kind.value, target, DeliveryState.PENDING.value, utcnow()),
                    )

    def due_notifications(self, now: str, limit: int) -> list[Notification]:
        """Each key's soonest notification whose time has come (with its `owner`), soonest first."""
        with self._using():
            # One row per key, so that one key's backlog never hides another key's notification.
            rows = self._db.execute(
                "SELECT id, job_id, kind, target, state, attempts, next_attempt_at, last_error, delivered_at, owner"
                " FROM (SELECT n.*, j.owner, ROW_NUMBER() OVER (PARTITION BY j.owner ORDER BY n.next_attempt_at,"
                " n.id) AS place FROM notifications n LEFT JOIN jobs j ON j.id = n.job_id"
                " WHERE n.state = ? AND n.next_attempt_at <= ?) WHERE place = 1 ORDER BY next_attempt_at LIMIT ?",
                (DeliveryState.PENDING.value, now, limit),
            ).fetchall()
        return [_notification(row) for row in rows]

    def notifications(self, job_id: str) -> list[Notification]:
        """A job's notifications, webhook first."""
        with self._using():
            rows = self._db.execute("SELECT * FROM notifications WHERE job_id = ? ORDER BY kind DESC", (job_id,))
            return [_notification(row) for row in rows.fetchall()]

    def record_attempt(self, notification: Notification) -> None:
        """Store a notification's state after an attempt."""
        with self._using():
            self._db.execute(
                "UPDATE notifications SET state = ?, attempts = ?, next_attempt_at = ?, last_error = ?,"
                " delivered_at = ? WHERE id = ?",
                (notification.state.value, notification.attempts, notification.next_attempt_at,
                 notification.last_error, notification.delivered_at, notification.id),
            )  # fmt: skip

    def owner(self, job_id: str) -> tuple[bool, str | None]:
        """Whether a job of this id is on record, and its owner: the same one lookup whatever the answer."""
        # An aggregate answers one row either way, so a known id and an unknown one take the same steps.
        with self._using():
            count, owner = self._db.execute("SELECT count(*), max(owner) FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return count > 0, owner

    def get(self, job_id: str) -> Job | None:
        """The stored record, or None."""
        with self._using():
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list_jobs(self, status: JobStatus | None, owner: str | None, limit: int, offset: int) -> list[Job]:
        """Records newest first, optionally of one status and of one owner only."""
        conditions, args = [], []
        if status is not None:
            conditions.append("status = ?")
            args.append(status.value)
        if owner is not None:
            conditions.append("owner = ?")
            args.append(owner)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        with self._using():
            rows = self._db.execute(
                f"SELECT * FROM jobs {where} ORDER BY seq DESC LIMIT ? OFFSET ?", [*args, limit, offset]
            ).fetchall()
        return [_job(row) for row in rows]

    def jobs_per_owner(self) -> dict[str | None, int]:
        """How many jobs each key has on record."""
        with self._using():
            rows = self._db.execute("SELECT owner, COUNT(*) FROM jobs GROUP BY owner").fetchall()
        return {row[0]: row[1] for row in rows}

    def unfinished(self) -> list[Job]:
        """Jobs left pending or in progress, oldest first."""
        with self._using():
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE status IN (?, ?) ORDER BY seq",
                (JobStatus.PENDING.value, JobStatus.IN_PROGRESS.value),
            ).fetchall()
        return [_job(row) for row in rows]

    def finished_before(self, cutoff: str) -> list[Job]:
        """Jobs that ended before cutoff and have not expired yet."""
        with self._using():
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE status IN (?, ?, ?) AND finished_at < ? AND expired_at IS NULL",
                (JobStatus.COMPLETED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value, cutoff),
            ).fetchall()
        return [_job(row) for row in rows]

    def mark_expired(self, job_id: str, moment: str) -> None:
        """Record that an ended job's files were deleted at `moment`."""
        with self._using():
            self._db.execute("UPDATE jobs SET expired_at = ? WHERE id = ?", (moment, job_id))

    def forget_expired_before(self, cutoff: str) -> int:
        """Delete the records of jobs that expired before cutoff; return how many."""
        with self._using():
            forgotten = self._db.execute("DELETE FROM jobs WHERE expired_at < ?", (cutoff,)).rowcount
            self._db.execute("DELETE FROM notifications WHERE job_id NOT IN (SELECT id FROM jobs)")
            return forgotten

    def close(self) -> None:
        """Close the connection."""
        with self._using():
            self._db.close()


def _values(job: Job) -> list[Any]:
    values = []
    for name in _FIELDS:
        value = getattr(job, name)
        if name == "options":
            value = json.dumps(value.as_dict())
        elif isinstance(value, JobStatus | JobStage):
            value = value.value
        values.append(value)
    return values


def _notification(row: sqlite3.Row) -> Notification:
    data = dict(row)
    data["kind"] = NotificationKind(data["kind"])
    data["state"] = DeliveryState(data["state"])
    return Notification(**data)


def _job(row: sqlite3.Row) -> Job:
    # Columns an older version added and no field reads any more (link_base) stay in the table, unread.
    data = {name: row[name] for name in (*_FIELDS, "seq")}
    data["options"] = TranscribeOptions.from_dict(json.loads(data["options"]))
    data["status"] = JobStatus(data["status"])
    data["stage"] = JobStage(data["stage"])
    data["isolated"] = bool(data["isolated"])  # SQLite has no booleans; NULL in older databases
    return Job(**data)
