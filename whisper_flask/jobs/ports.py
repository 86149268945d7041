"""The two places where the cluster mode plugs in: where jobs are stored, and where they are handed to run.

Today's implementations are `store.SqlJobStore` (SQLite or PostgreSQL) and `runner.PoolRunner` (one process). The
registry, retention, the notifier and the service know only these interfaces (ARCHITECTURE.md, "Ports").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from whisper_flask.jobs.records import Job, JobStatus, JobView, Notification, QueueCounts


@dataclass(frozen=True)
class Fence:
    """What a write requires of the stored record: a status among `statuses`, and the lease `lease_owner`'s if given.

    A cluster worker writes its job's record only while it holds the job's lease (jobs/leases.py).
    """

    statuses: tuple[JobStatus, ...]
    lease_owner: str | None = None


class JobChanged(Exception):
    """A fenced write found the record changed: cancelled, ended, or taken over by another worker."""


class JobStore(Protocol):
    """Durable job records and the notification outbox; every write is committed before it returns."""

    def insert(self, job: Job) -> int:
        """Store a new job and return its sequence number (submission order)."""

    def update(self, job: Job, fence: Fence | None = None) -> None:
        """Replace a job's record; an ended job's notifications join the outbox in the same transaction.

        With a `fence`, only a record that meets it is replaced; JobChanged otherwise.
        """

    def owner(self, job_id: str) -> tuple[bool, str | None]:
        """Whether a job of this id is on record, and its owner: the same one lookup whatever the answer."""
        ...

    def update_all(self, jobs: list[Job], fence: Fence | None = None) -> None:
        """Replace these jobs' records in one transaction: all or none (JobChanged if one fails `fence`)."""

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


class Registry(Protocol):
    """Pending and running jobs: registry.JobRegistry in one process, shared_registry.SharedRegistry in a cluster."""

    @property
    def accepting(self) -> bool:
        """True between open() and close()."""

    def open(self) -> None:
        """Start taking jobs."""

    def close(self) -> None:
        """Stop taking and starting jobs; running ones stop at their next decoder step."""

    def recover(self) -> tuple[list[str], list[Job]]:
        """Queue again what a dead process left: (the ids queued, the jobs failed instead)."""

    def check_capacity(self, owner: str | None) -> None:
        """Raise ShuttingDown, QueueFull or TooManyJobs if no job of `owner` can be accepted now."""

    def add(self, job: Job) -> JobView:
        """Record a new job durably and make it pending."""

    def view(self, job_id: str) -> JobView:
        """The job and its queue position, as of one moment; JobNotFound if unknown."""

    def views(self, status: JobStatus | None, owner: str | None, limit: int, offset: int) -> list[JobView]:
        """Jobs newest first, the pending ones with their queue position."""

    def counts(self) -> QueueCounts:
        """Pending and running jobs now, and the capacity."""

    def cancel(self, job_id: str) -> tuple[Job, bool]:
        """Cancel a pending or running job: (its final record, whether it was pending)."""

    def wait_until_ended(self, job_id: str, timeout: float | None) -> bool:
        """Wait at most `timeout` s for the job to end or the registry to close; whether it ended."""

    def wait_until_closed(self, timeout: float) -> None:
        """Wait at most `timeout` s, less if the registry closes meanwhile."""

    def start_next(self) -> Job | None:
        """Start the pending job whose turn it is; None if none may."""

    def check_active(self, job_id: str) -> None:
        """Raise JobCancelled if the job no longer runs here."""

    def update(self, job_id: str, *, persist: bool = True, **changes: Any) -> Job:
        """Change a running job's fields (stored if `persist`); JobCancelled if it no longer runs here."""

    def finish(self, job_id: str, status: JobStatus, code: str | None = None, message: str | None = None) -> None:
        """End a running job."""

    def put_back(self, job_id: str) -> None:
        """Return a job stopped by a graceful stop to pending, at no attempt's cost."""

    def abandon(self, job_id: str) -> None:
        """Forget a running job whose end the store refused."""
