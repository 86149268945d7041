"""The cluster mode's leases on PostgreSQL: which worker runs a job, claimed and renewed atomically.

A worker claims the pending job whose turn it is (rotation.py) and holds a lease on it that its
heartbeat renews (upkeep.py). Every write a worker makes to its job's record is fenced by the lease
(`Fence`), so a worker that lost its lease (it stalled, the job was taken over, or cancelled) can
no longer change the record: no job ever runs to completion on two workers. Leases and heartbeats
use the database's clock, never the nodes' (ARCHITECTURE.md, "Cluster").
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, false, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError

from whisper_flask.jobs import schema
from whisper_flask.jobs.records import DeliveryState, Job, JobStage, JobStatus, Notification, utcnow
from whisper_flask.jobs.rotation import start_order
from whisper_flask.jobs.store import job_from_row

#: How long a node's claim on a notification lasts if the node dies before recording its attempt (an
#: attempt takes at most 30 s for a webhook, SMTP's timeout for an e-mail).
NOTIFICATION_CLAIM_S = 120
#: Advisory lock keys (arbitrary, fixed): claims and admissions are serialised cluster-wide by them,
#: and one reconciler at a time runs.
CLAIM_LOCK = 0x57464C01
ADMIT_LOCK = 0x57464C02
RECONCILE_LOCK = 0x57464C03


@dataclass(frozen=True)
class WorkerRecord:
    """A worker node as its last heartbeat left it."""

    name: str
    host: str
    model: str
    running: int
    capacity: int
    started_at: str
    heartbeat_at: str
    seconds_since_heartbeat: float


def node_name() -> str:
    """This process's name in the cluster: host and pid, unique while it lives."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Leases:
    """Claims, renewals and take-overs of jobs, and the workers' heartbeats, in one PostgreSQL database."""

    def __init__(self, engine: Engine, lease_s: float) -> None:
        self._engine = engine
        self._lease = f"{float(lease_s)} seconds"

    @contextlib.contextmanager
    def holding(self, key: int) -> Iterator[Connection]:
        """A transaction holding a cluster-wide lock (released at its end)."""
        with self._engine.begin() as connection:
            connection.execute(select(func.pg_advisory_xact_lock(key)))
            yield connection

    def pending_order(self, connection: Connection | None = None) -> list[Job]:
        """The pending jobs of the whole cluster in the order they will start (round-robin over keys)."""
        with contextlib.ExitStack() as stack:
            if connection is None:
                connection = stack.enter_context(self._engine.connect())
            pending = [job_from_row(row) for row in connection.execute(
                select(schema.jobs).where(schema.jobs.c.status == JobStatus.PENDING.value)
            ).mappings()]  # fmt: skip
            return start_order(pending, _turn_ranks(connection, {job.owner for job in pending}))

    def claim(self, worker: str, may_start: Callable[[Job, list[Job]], bool]) -> Job | None:
        """Start the first pending job (in turn order) that may start on this worker; None if none may."""
        with self.holding(CLAIM_LOCK) as connection:
            running = [job_from_row(row) for row in connection.execute(
                select(schema.jobs).where(schema.jobs.c.status == JobStatus.IN_PROGRESS.value,
                                          schema.jobs.c.lease_owner == worker)
            ).mappings()]  # fmt: skip
            chosen = next((job for job in self.pending_order(connection) if may_start(job, running)), None)
            if chosen is None:
                return None
            row = (
                connection.execute(
                    update(schema.jobs)
                    .where(schema.jobs.c.id == chosen.id, schema.jobs.c.status == JobStatus.PENDING.value)
                    .values(
                        status=JobStatus.IN_PROGRESS.value,
                        stage=JobStage.DECODING_AUDIO.value,
                        started_at=utcnow(),
                        attempts=schema.jobs.c.attempts + 1,
                        lease_owner=worker,
                        lease_until=func.now() + text(f"interval '{self._lease}'"),
                    )
                    .returning(schema.jobs)
                )
                .mappings()
                .one()
            )
            return job_from_row(row)

    def beat(self, worker: str, job_ids: list[str], model: str, capacity: int) -> set[str]:
        """A worker's heartbeat, one transaction: extend its leases on these jobs, refresh its row in `workers`.

        Returns the ids it still holds; the others were cancelled or taken over.
        """
        values = {"host": socket.gethostname(), "model": model, "capacity": capacity, "heartbeat_at": func.now()}
        with self._engine.begin() as connection:
            held = {row[0] for row in connection.execute(
                update(schema.jobs)
                .where(
                    schema.jobs.c.id.in_(job_ids),
                    schema.jobs.c.lease_owner == worker,
                    schema.jobs.c.status == JobStatus.IN_PROGRESS.value,
                )
                .values(lease_until=func.now() + text(f"interval '{self._lease}'"))
                .returning(schema.jobs.c.id)
            )} if job_ids else set()  # fmt: skip
            values["running"] = len(held)
            connection.execute(
                insert(schema.workers)
                .values(name=worker, started_at=func.now(), **values)
                .on_conflict_do_update(index_elements=["name"], set_=values)
            )
        return held

    def expired(self, connection: Connection) -> dict[str, list[Job]]:
        """Running jobs whose lease ran out (their worker died or stalled), oldest first, by their worker."""
        rows = connection.execute(
            select(schema.jobs)
            .where(schema.jobs.c.status == JobStatus.IN_PROGRESS.value, schema.jobs.c.lease_until < func.now())
            .order_by(schema.jobs.c.seq)
        ).mappings()
        by_worker: dict[str, list[Job]] = {}
        for row in rows:
            by_worker.setdefault(row["lease_owner"] or "", []).append(job_from_row(row))
        return by_worker

    def claim_notification(self, notification: Notification, node: str) -> bool:
        """Take a due notification for this node to send, unless another node holds it; whether it is ours."""
        with self._engine.begin() as connection:
            claimed = connection.execute(
                update(schema.notifications)
                .where(
                    schema.notifications.c.id == notification.id,
                    schema.notifications.c.state == DeliveryState.PENDING.value,
                    schema.notifications.c.next_attempt_at <= utcnow(),
                    or_(
                        schema.notifications.c.claimed_until.is_(None),
                        schema.notifications.c.claimed_until < func.now(),
                    ),
                )
                .values(claimed_by=node, claimed_until=func.now() + text(f"interval '{NOTIFICATION_CLAIM_S} seconds'"))
            ).rowcount
        return claimed == 1

    def reachable(self) -> bool:
        """Whether the database answers now."""
        try:
            with self._engine.connect() as connection:
                connection.execute(select(1))
        except SQLAlchemyError:
            return False
        return True

    def leave(self, worker: str) -> None:
        """Remove this worker's row at a clean stop."""
        with self._engine.begin() as connection:
            connection.execute(schema.workers.delete().where(schema.workers.c.name == worker))

    def forget_workers(self, connection: Connection, after_s: float) -> None:
        """Delete the rows of workers not heard from for `after_s` (they died without leaving)."""
        age = func.extract("epoch", func.now() - schema.workers.c.heartbeat_at)
        connection.execute(schema.workers.delete().where(age > after_s))

    def workers(self) -> list[WorkerRecord]:
        """The workers' rows, by name, with how long ago each beat."""
        age = func.extract("epoch", func.now() - schema.workers.c.heartbeat_at)
        with self._engine.connect() as connection:
            rows = connection.execute(select(schema.workers, age.label("age")).order_by(schema.workers.c.name)).all()
        return [
            WorkerRecord(row.name, row.host, row.model, row.running, row.capacity, row.started_at.isoformat(),
                         row.heartbeat_at.isoformat(), round(float(row.age), 1))
            for row in rows
        ]  # fmt: skip


def _turn_ranks(connection: Connection, owners: set[str | None]) -> dict[str | None, int]:
    """These keys' last starts as ranks (rotation.py): the key whose last start is longest ago ranks lowest."""
    # Only the keys with pending jobs: every queue position and claim asks, and the table holds
    # RETENTION_DAYS of every key's jobs.
    if not owners:
        return {}
    named = [owner for owner in owners if owner is not None]
    of_these = or_(schema.jobs.c.owner.in_(named), schema.jobs.c.owner.is_(None) if None in owners else false())
    rows = connection.execute(
        select(schema.jobs.c.owner, func.max(schema.jobs.c.started_at))
        .where(schema.jobs.c.started_at.is_not(None), of_these)
        .group_by(schema.jobs.c.owner)
    ).all()
    return {owner: rank for rank, (owner, _) in enumerate(sorted(rows, key=lambda row: row[1]))}
