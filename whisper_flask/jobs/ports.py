"""The two places where the cluster mode plugs in: where jobs are stored, and where they are handed to run.

Today's implementations are `store.SqlJobStore` (SQLite or PostgreSQL) and `runner.PoolRunner` (one process). The
registry, retention, the notifier and the service know only these interfaces (ARCHITECTURE.md, "Ports").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from whisper_flask.jobs.records import Job, JobStatus, Notification


class JobStore(Protocol):
    """Durable job records and the notification outbox; every write is committed before it returns."""

    def insert(self, job: Job) -> int:
        """Store a new job and return its sequence number (submission order)."""

    def update(self, job: Job) -> None:
        """Replace a job's record; an ended job's notifications join the outbox in the same transaction."""

    def owner(self, job_id: str) -> tuple[bool, str | None]:
        """Whether a job of this id is on record, and its owner: the same one lookup whatever the answer."""
        ...

    def update_all(self, jobs: list[Job]) -> None:
        """Replace these jobs' records in one transaction: all of them are stored, or none."""

    def get(self, job_id: str) -> Job | None:
        """The stored record, or None."""

    def list_jobs(self, status: JobStatus | None, owner: str | None, limit: int, offset: int) -> list[Job]:
        """Records newest first, optionally of one status and of one owner only."""

    def jobs_per_owner(self) -> dict[str | None, int]:
        """How many jobs each key has on record."""

    def unfinished(self) -> list[Job]:
        """Jobs left pending or in progress, oldest first."""

    def finished_before(self, cutoff: str) -> list[Job]:
        """Jobs that ended before cutoff and have not expired yet."""

    def mark_expired(self, job_id: str, moment: str) -> None:
        """Record that an ended job's files were deleted at `moment`."""

    def forget_expired_before(self, cutoff: str) -> int:
        """Delete the records of jobs that expired before cutoff; return how many."""

    def due_notifications(self, now: str, limit: int) -> list[Notification]:
        """Each key's soonest notification whose time has come (with its `owner`), soonest first."""

    def notifications(self, job_id: str) -> list[Notification]:
        """A job's notifications, webhook first."""

    def record_attempt(self, notification: Notification) -> None:
        """Store a notification's state after an attempt."""

    def close(self) -> None:
        """Release the connection."""


class JobRunner(Protocol):
    """Where accepted jobs are handed to run: one ticket per job, run by `run(ticket)` when a worker is free.

    The ticket is the id of the job whose arrival it stands for, but `run` starts the pending job
    whose turn it is, as the registry chooses at that moment (round-robin over keys, rotation.py);
    so the runner's own queue order never decides which job runs.
    """

    def start(self, run: Callable[[str], None]) -> None:
        """Begin taking tickets; each is run by calling `run` with it, once a worker is free."""

    def submit(self, job_id: str) -> None:
        """Hand over a ticket for a pending, durable job; after stop() it is dropped (the next start queues the job)."""

    def stop(self) -> None:
        """Stop taking jobs and wait for the running ones to return."""
