"""Durable job records and the notification outbox on SQLAlchemy Core: the JobStore (jobs/ports.py).

One set of queries for SQLite (one process) and PostgreSQL (cluster mode), on schema.py's tables
and the engine jobs/database.py opens. The cluster's columns (leases, claims) are left to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Executable,
    RowMapping,
    Select,
    Update,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from whisper_flask.engine.options import TranscribeOptions
from whisper_flask.jobs.database import READ_ONLY, database_path, storage_errors
from whisper_flask.jobs.ports import Fence, JobChanged
from whisper_flask.jobs.records import DeliveryState, Job, JobStage, JobStatus, Notification, NotificationKind, utcnow
from whisper_flask.jobs.schema import jobs, notifications

_FIELDS = [f.name for f in dataclasses.fields(Job) if f.name != "seq"]
#: The columns a Job is read from (a KeyError here, at import, if schema.py lacks one of its fields).
_JOB_COLUMNS = [jobs.c[name] for name in (*_FIELDS, "seq")]
_NOTIFICATION_COLUMNS = [notifications.c[f.name] for f in dataclasses.fields(Notification) if f.name != "owner"]
_UNFINISHED = (JobStatus.PENDING.value, JobStatus.IN_PROGRESS.value)
_ENDED = (JobStatus.COMPLETED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value)

# The statements are built once, their values bound at each call: building and hashing a statement
# costs SQLAlchemy more than SQLite takes to run it. An UPDATE sets the columns its parameters name.
_INSERT_JOB = insert(jobs).returning(jobs.c.seq)
_UPDATE_JOB = update(jobs).where(jobs.c.id == bindparam("job_id"))
_GET_JOB = select(*_JOB_COLUMNS).where(jobs.c.id == bindparam("job_id"))
# An aggregate answers one row either way, so a known id and an unknown one take the same steps.
_OWNER = select(func.count().label("count"), func.max(jobs.c.owner).label("owner"))
_OWNER = _OWNER.where(jobs.c.id == bindparam("job_id"))
_PER_OWNER = select(jobs.c.owner, func.count().label("count")).group_by(jobs.c.owner)
_UNFINISHED_JOBS = select(*_JOB_COLUMNS).where(jobs.c.status.in_(_UNFINISHED)).order_by(jobs.c.seq)
_FINISHED_BEFORE = (
    select(*_JOB_COLUMNS)
    .where(jobs.c.status.in_(_ENDED), jobs.c.finished_at < bindparam("cutoff"), jobs.c.expired_at.is_(None))
    .order_by(jobs.c.seq)
)
_FORGET_JOBS = delete(jobs).where(jobs.c.expired_at < bindparam("cutoff"))
_FORGET_NOTIFICATIONS = delete(notifications).where(notifications.c.job_id.not_in(select(jobs.c.id)))
_NOTIFICATIONS_OF = (
    select(*_NOTIFICATION_COLUMNS)
    .where(notifications.c.job_id == bindparam("job_id"))
    .order_by(notifications.c.kind.desc())
)
_RECORD_ATTEMPT = update(notifications).where(notifications.c.id == bindparam("notification_id"))


def _due_notifications() -> Select[Any]:
    # One row per key (the soonest), so that one key's backlog never hides another key's notification.
    place = func.row_number().over(
        partition_by=jobs.c.owner, order_by=(notifications.c.next_attempt_at, notifications.c.id)
    )
    due = (
        select(*_NOTIFICATION_COLUMNS, jobs.c.owner, place.label("place"))
        .select_from(notifications.outerjoin(jobs, jobs.c.id == notifications.c.job_id))
        .where(notifications.c.state == DeliveryState.PENDING.value)
        .where(notifications.c.next_attempt_at <= bindparam("now"))
        .subquery()
    )
    return (
        select(*(due.c[column.name] for column in _NOTIFICATION_COLUMNS), due.c.owner)
        .where(due.c.place == 1)
        .order_by(due.c.next_attempt_at, due.c.id)
        .limit(bindparam("limit"))
    )


_DUE_NOTIFICATIONS = _due_notifications()


@functools.cache
def _list_jobs(by_status: bool, by_owner: bool) -> Select[Any]:
    query = select(*_JOB_COLUMNS)
    if by_status:
        query = query.where(jobs.c.status == bindparam("status"))
    if by_owner:
        query = query.where(jobs.c.owner == bindparam("owner"))
    return query.order_by(jobs.c.seq.desc()).limit(bindparam("limit")).offset(bindparam("offset"))


class StoreClosed(RuntimeError):
    """A store was used after close()."""


class SqlJobStore:
    """Commits every write before returning; safe to share between threads.

    `engine` is public: the cluster mode's operations (leases, claims, workers) run on it too.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._reader = engine.execution_options(**{READ_ONLY: True})
        self._path = database_path(engine)  # where a full disk is looked for (SQLite)
        self._closed = False
        # INSERT ... ON CONFLICT DO NOTHING is each dialect's own construct.
        dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
        self._insert_notifications = dialect.insert(notifications).on_conflict_do_nothing()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Connection]:
        # Committed when the block ends; a full disk as StorageFull (507, and the pipeline waits for space).
        if self._closed:
            raise StoreClosed("the job store is closed")
        with storage_errors(self._path), self.engine.begin() as connection:
            yield connection

    def _read(self, statement: Executable, **values: Any) -> Sequence[RowMapping]:
        # One statement: on SQLite it needs no transaction (READ_ONLY), so no write lock either.
        if self._closed:
            raise StoreClosed("the job store is closed")
        with storage_errors(self._path), self._reader.connect() as connection:
            return connection.execute(statement, values).mappings().all()

    def _jobs(self, statement: Executable, **values: Any) -> list[Job]:
        return [job_from_row(row) for row in self._read(statement, **values)]

    def insert(self, job: Job) -> int:
        """Store a new job and return its sequence number (submission order)."""
        with self._transaction() as connection:
            return int(connection.execute(_INSERT_JOB, _values(job)).scalar_one())

    def insert_admitted(self, job: Job, admit: Callable[[list[Job]], None], lock: int) -> int:
        """Insert `job` if `admit` (shown the unfinished jobs) does not raise, under a PostgreSQL advisory lock.

        One transaction and one connection: nodes admit one at a time, and a waiting admission holds
        no second connection that the one holding the lock might need.
        """
        with self._transaction() as connection:
            connection.execute(select(func.pg_advisory_xact_lock(lock)))
            admit([job_from_row(row) for row in connection.execute(_UNFINISHED_JOBS).mappings()])
            return int(connection.execute(_INSERT_JOB, _values(job)).scalar_one())

    def update(self, job: Job, fence: Fence | None = None) -> None:
        """Replace a job's stored record with this one; an ended job's notifications join the outbox with it.

        With a `fence`, only a record that meets it is replaced; JobChanged otherwise.
        """
        self.update_all([job], fence)

    def update_all(self, jobs: list[Job], fence: Fence | None = None) -> None:
        """Replace these jobs' records in one transaction: all or none (JobChanged if one fails `fence`)."""
        # One transaction: no crash can leave an ended job without its notifications, nor the
        # crash rule's verdicts half written (the next start would judge from half of them).
        with self._transaction() as connection:
            for job in jobs:
                self._write(connection, job, fence)

    def _write(self, connection: Connection, job: Job, fence: Fence | None) -> None:
        # Inside the caller's transaction; JobChanged rolls it back.
        if fence is None:
            connection.execute(_UPDATE_JOB, {**_values(job), "job_id": job.id})
        elif connection.execute(_fenced(fence), {**_values(job), "job_id": job.id}).rowcount != 1:
            raise JobChanged(job.id)
        if not job.status.terminal:
            return
        rows = [
            {"job_id": job.id, "kind": kind.value, "target": target, "state": DeliveryState.PENDING.value,
             "attempts": 0, "next_attempt_at": utcnow()}
            for kind, target in ((NotificationKind.WEBHOOK, job.callback_url),
                                 (NotificationKind.EMAIL, job.notify_email))
            if target
        ]  # fmt: skip
        if rows:  # once per job and kind, however often its end is written
            connection.execute(self._insert_notifications, rows)

    def due_notifications(self, now: str, limit: int) -> list[Notification]:
        """Each key's soonest notification whose time has come (with its `owner`), soonest first."""
        return [_notification(row) for row in self._read(_DUE_NOTIFICATIONS, now=now, limit=limit)]

    def notifications(self, job_id: str) -> list[Notification]:
        """A job's notifications, webhook first."""
        return [_notification(row) for row in self._read(_NOTIFICATIONS_OF, job_id=job_id)]

    def record_attempt(self, notification: Notification) -> None:
        """Store a notification's state after an attempt."""
        with self._transaction() as connection:
            connection.execute(
                _RECORD_ATTEMPT,
                {"notification_id": notification.id, "state": notification.state.value,
                 "attempts": notification.attempts, "next_attempt_at": notification.next_attempt_at,
                 "last_error": notification.last_error, "delivered_at": notification.delivered_at,
                 "claimed_by": None, "claimed_until": None},  # a cluster's claim on it ends with the attempt
            )  # fmt: skip

    def owner(self, job_id: str) -> tuple[bool, str | None]:
        """Whether a job of this id is on record, and its owner: the same one lookup whatever the answer."""
        (row,) = self._read(_OWNER, job_id=job_id)
        return row["count"] > 0, row["owner"]

    def get(self, job_id: str) -> Job | None:
        """The stored record, or None."""
        rows = self._read(_GET_JOB, job_id=job_id)
        return job_from_row(rows[0]) if rows else None

    def list_jobs(self, status: JobStatus | None, owner: str | None, limit: int, offset: int) -> list[Job]:
        """Records newest first, optionally of one status and of one owner only."""
        query = _list_jobs(status is not None, owner is not None)
        return self._jobs(query, status=status.value if status else None, owner=owner, limit=limit, offset=offset)

    def jobs_per_owner(self) -> dict[str | None, int]:
        """How many jobs each key has on record."""
        return {row["owner"]: row["count"] for row in self._read(_PER_OWNER)}

    def unfinished(self) -> list[Job]:
        """Jobs left pending or in progress, oldest first."""
        return self._jobs(_UNFINISHED_JOBS)

    def finished_before(self, cutoff: str) -> list[Job]:
        """Jobs that ended before cutoff and have not expired yet."""
        return self._jobs(_FINISHED_BEFORE, cutoff=cutoff)

    def mark_expired(self, job_id: str, moment: str) -> None:
        """Record that an ended job's files were deleted at `moment`."""
        with self._transaction() as connection:
            connection.execute(_UPDATE_JOB, {"job_id": job_id, "expired_at": moment})

    def forget_expired_before(self, cutoff: str) -> int:
        """Delete the records of jobs that expired before cutoff; return how many."""
        with self._transaction() as connection:
            forgotten = connection.execute(_FORGET_JOBS, {"cutoff": cutoff}).rowcount
            connection.execute(_FORGET_NOTIFICATIONS)
        return forgotten

    def close(self) -> None:
        """Close the engine's connections; the store refuses every later call."""
        self._closed = True
        self.engine.dispose()


def _fenced(fence: Fence) -> Update:
    """An update of the job whose id is bound, only if its record meets `fence` (status, lease holder)."""
    statement = _UPDATE_JOB.where(jobs.c.status.in_([status.value for status in fence.statuses]))
    return statement if fence.lease_owner is None else statement.where(jobs.c.lease_owner == fence.lease_owner)


def _values(job: Job) -> dict[str, Any]:
    values = {}
    for name in _FIELDS:
        value = getattr(job, name)
        if name == "options":
            value = json.dumps(value.as_dict())
        elif isinstance(value, JobStatus | JobStage):
            value = value.value
        values[name] = value
    return values


def _notification(row: RowMapping) -> Notification:
    data = dict(row)
    data["kind"] = NotificationKind(data["kind"])
    data["state"] = DeliveryState(data["state"])
    return Notification(**data)


def job_from_row(row: RowMapping) -> Job:
    """The Job of a row of the jobs table; other columns (the cluster's lease, an old version's link_base) are left."""
    data = {name: row[name] for name in (*_FIELDS, "seq")}
    data["options"] = TranscribeOptions.from_dict(json.loads(data["options"]))
    data["status"] = JobStatus(data["status"])
    data["stage"] = JobStage(data["stage"])
    data["isolated"] = bool(data["isolated"])  # NULL in databases from before the column
    return Job(**data)
