"""The cluster mode's registry: every node's jobs in PostgreSQL; the jobs this node runs also in memory.

It answers what `registry.JobRegistry` answers, for an API node (add, view, cancel, wait) and for a
worker (start_next, update, finish), but the database is the one truth: admissions and claims are
serialised by cluster-wide advisory locks (leases.py), and a worker's every write is fenced by its
lease, so a worker that lost a job can no longer change its record (ARCHITECTURE.md, "Cluster").
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from whisper_flask.exceptions import JobNotFound, ShuttingDown
from whisper_flask.jobs.admission import QueueLimits
from whisper_flask.jobs.crash_rule import may_start
from whisper_flask.jobs.leases import ADMIT_LOCK, Leases
from whisper_flask.jobs.ports import Fence, JobChanged
from whisper_flask.jobs.records import Job, JobStatus, JobView, QueueCounts, ended, pending_again, utcnow
from whisper_flask.jobs.registry import Gate, JobCancelled
from whisper_flask.jobs.store import SqlJobStore

log = logging.getLogger(__name__)

#: How often a wait for a job's end reads its record.
POLL_S = 0.25
_ACTIVE = (JobStatus.PENDING, JobStatus.IN_PROGRESS)


class SharedRegistry(Gate):
    """Jobs of the whole cluster, read from and changed in the database; this node's running jobs in memory."""

    def __init__(
        self,
        store: SqlJobStore,
        leases: Leases,
        capacity: int,
        per_owner: int,
        node: str,
        requeue: Callable[[str], None] = lambda job_id: None,
    ) -> None:
        super().__init__()
        self._running: dict[str, Job] = {}
        self._store = store
        self._leases = leases
        self._limits = QueueLimits(capacity, per_owner)
        self._node = node
        self._fence = Fence((JobStatus.IN_PROGRESS,), node)
        self._requeue = requeue  # a ticket for a job this node put back, so that another worker takes it at once

    def recover(self) -> tuple[list[str], list[Job]]:
        """Nothing to recover at a node's start: the reconciler takes over dead workers' jobs (upkeep.py)."""
        return [], []

    # -- intake and queries (API nodes) ----------------------------------------------------

    def check_capacity(self, owner: str | None) -> None:
        """Raise ShuttingDown, QueueFull or TooManyJobs if the cluster takes no job of `owner` now."""
        if not self._open:
            raise ShuttingDown("the service is not accepting jobs")
        self._limits.refuse_if_full(self._store.unfinished(), owner)

    def add(self, job: Job) -> JobView:
        """Record a new job durably and make it pending, the cluster's capacity checked under its lock."""
        if not self._open:
            raise ShuttingDown("the service is not accepting jobs")
        # Counted and inserted under a cluster-wide lock: no other node takes the last place between.
        self._store.insert_admitted(job, lambda active: self._limits.refuse_if_full(active, job.owner), ADMIT_LOCK)
        return self.view(job.id)

    def view(self, job_id: str) -> JobView:
        """The job as stored, with its place in the cluster's queue if pending; JobNotFound if unknown."""
        job = self._store.get(job_id)
        if job is None:
            raise JobNotFound(f"no job with id {job_id!r}")
        if job.status is not JobStatus.PENDING:
            return JobView(job)
        return JobView(job, self._positions().get(job.id))

    def views(self, status: JobStatus | None, owner: str | None, limit: int, offset: int) -> list[JobView]:
        """Jobs newest first (of one owner only, unless None), pending ones with their queue position."""
        stored = self._store.list_jobs(status, owner, limit, offset)
        positions = self._positions() if any(job.status is JobStatus.PENDING for job in stored) else {}
        return [JobView(job, positions.get(job.id)) for job in stored]

    def _positions(self) -> dict[str, int]:
        return {job.id: place for place, job in enumerate(self._leases.pending_order(), 1)}

    def counts(self) -> QueueCounts:
        """Pending and running jobs in the cluster now, and the capacity."""
        statuses = [job.status for job in self._store.unfinished()]
        return QueueCounts(
            statuses.count(JobStatus.PENDING), statuses.count(JobStatus.IN_PROGRESS), self._limits.capacity
        )

    def cancel(self, job_id: str) -> tuple[Job, bool]:
        """Cancel a pending or running job wherever it runs: (its final record, whether it was pending)."""
        for _ in range(10):  # each retry means the job started or ended meanwhile; it cannot flip for ever
            job = self.view(job_id).job
            if job.status not in _ACTIVE:
                return job, False
            cancelled = dataclasses.replace(job, status=JobStatus.CANCELLED, finished_at=utcnow(), eta_seconds=None)
            try:
                self._store.update(cancelled, Fence((job.status,)))  # its worker sees it at its next heartbeat
            except JobChanged:
                continue
            log.info("job %s cancelled", job_id)
            return cancelled, job.status is JobStatus.PENDING
        raise JobChanged(job_id)

    def wait_until_ended(self, job_id: str, timeout: float | None) -> bool:
        """Wait at most `timeout` s for the job to end (its record read every POLL_S) or this node to close."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self._store.get(job_id)
            if job is None or job.status.terminal:
                return True
            left = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
            with self._lock:
                if left <= 0 or self._changed.wait_for(lambda: not self._open, left):
                    return False

    # -- a job's life on this worker -------------------------------------------------------

    def start_next(self) -> Job | None:
        """Claim the pending job whose turn it is, with a lease for this node; None if none may start here."""
        if not self._open:
            return None
        job = self._leases.claim(self._node, may_start)  # an isolated job runs alone on its worker
        if job is not None:
            with self._lock:
                self._running[job.id] = job
        return job

    def running_ids(self) -> list[str]:
        """The jobs this node runs now."""
        with self._lock:
            return list(self._running)

    def lost(self, job_ids: set[str]) -> None:
        """These jobs' leases are gone (cancelled, or taken over): they stop at their next decoder step."""
        with self._lock:
            for job_id in job_ids & self._running.keys():
                del self._running[job_id]
                log.warning("job %s no longer runs here: cancelled or taken over", job_id)
            self._changed.notify_all()

    def check_active(self, job_id: str) -> None:
        """Raise JobCancelled if this node no longer runs the job."""
        if job_id not in self._running:  # a dict lookup, lock-free: see JobRegistry.check_active
            raise JobCancelled(job_id)

    def update(self, job_id: str, *, persist: bool = True, **changes: Any) -> Job:
        """Change a running job's fields (stored, fenced by the lease, if `persist`); JobCancelled if lost."""
        with self._lock:  # held across the write, so one job's records reach the database in order
            job = self._running.get(job_id)
            if job is None:
                raise JobCancelled(job_id)
            job = dataclasses.replace(job, **changes)
            if persist:
                self._write(job)
            self._running[job_id] = job
            return job

    def finish(self, job_id: str, status: JobStatus, code: str | None = None, message: str | None = None) -> None:
        """End a running job; a job cancelled or taken over meanwhile keeps what the database has."""
        with self._lock:
            job = self._running.get(job_id)
            if job is not None:
                try:
                    self._write(ended(job, status, code, message))
                except JobCancelled:
                    return
                del self._running[job_id]
                self._changed.notify_all()
        if job is not None:
            log.info("job %s %s", job_id, status.value)

    def put_back(self, job_id: str) -> None:
        """Return a job stopped by this worker's shutdown to pending; the stop costs it no attempt."""
        with self._lock:
            job = self._running.get(job_id)
            if job is None:
                return
            try:
                self._write(dataclasses.replace(pending_again(job), attempts=job.attempts - 1))
            except JobCancelled:
                return
            del self._running[job_id]
            self._changed.notify_all()
        log.info("job %s back to pending for another worker", job_id)
        self._requeue(job_id)

    def abandon(self, job_id: str) -> None:
        """Forget a running job whose end the database refused; its lease runs out and the reconciler takes it."""
        with self._lock:
            self._running.pop(job_id, None)
            self._changed.notify_all()
        log.error("job %s abandoned: its end could not be stored", job_id)

    def _write(self, job: Job) -> None:
        # Caller holds the lock. The lease fences the write: a lost job raises JobCancelled and leaves memory.
        try:
            self._store.update(job, self._fence)
        except JobChanged:
            self._running.pop(job.id, None)
            self._changed.notify_all()
            raise JobCancelled(job.id) from None
