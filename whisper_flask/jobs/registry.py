"""The registry of active jobs: their live records, the queue's capacity and order, under one lock.

Pending and running jobs live here and in the store; ended ones only in the store. Every change is
written to the store under the lock, so the stored record never goes back in time, and every
answer (a JobView) is read under it, so its record and queue position belong to one moment.
Each change is written first and made in memory only once the store has it: a write the store
refuses (StorageFull on a full disk) raises and leaves the job as stored, never half-changed.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

from whisper_flask.exceptions import JobNotFound, JobStopped, ShuttingDown
from whisper_flask.jobs.admission import QueueLimits
from whisper_flask.jobs.crash_rule import judge_and_store, may_start
from whisper_flask.jobs.ports import JobStore
from whisper_flask.jobs.records import Job, JobStage, JobStatus, JobView, QueueCounts, ended, pending_again, utcnow
from whisper_flask.jobs.rotation import Turns

log = logging.getLogger(__name__)


class JobCancelled(JobStopped):
    """The job left the registry (cancelled) while its pipeline ran; it stops at its next decoder step."""


class Gate:
    """A registry's lock, its condition, and whether it is open: what both registries (ports.Registry) share."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a job came, ended or left, or the registry closed
        self._open = False

    @property
    def accepting(self) -> bool:
        """True between open() and close(): new jobs are taken and pending ones may start."""
        return self._open

    def open(self) -> None:
        """Start taking jobs."""
        with self._lock:
            self._open = True

    def close(self) -> None:
        """Stop taking jobs and starting pending ones; running ones stop at their next decoder step."""
        with self._lock:
            self._open = False
            self._changed.notify_all()

    def wait_until_closed(self, timeout: float) -> None:
        """Wait at most `timeout` s, less if the registry closes meanwhile (the service stopping)."""
        with self._lock:
            self._changed.wait_for(lambda: not self._open, timeout)


class JobRegistry(Gate):
    """Pending and running jobs, changed and read under one lock."""

    def __init__(self, store: JobStore, capacity: int, per_owner: int) -> None:
        super().__init__()
        self._active: dict[str, Job] = {}
        self._turns = Turns()  # each key's turn in the rotation
        # Pending jobs' queue positions; None once a job has joined, started or left. Polls read it, and a
        # window's progress does not change it, so it is not sorted again per /progress poll.
        self._positions: dict[str, int] | None = None
        self._store = store
        self._limits = QueueLimits(capacity, per_owner)

    # -- intake ---------------------------------------------------------------------------

    def check_capacity(self, owner: str | None) -> None:
        """Raise ShuttingDown, QueueFull or TooManyJobs (for `owner`'s share) if no job can be accepted now."""
        with self._lock:
            self._refuse_if_full(owner)

    def _refuse_if_full(self, owner: str | None) -> None:
        # Caller holds the lock.
        if not self._open:
            raise ShuttingDown("the service is not accepting jobs")
        self._limits.refuse_if_full(self._active.values(), owner)

    def add(self, job: Job) -> JobView:
        """Record a new job durably and make it pending; raise if the queue is full or closed."""
        with self._lock:
            self._refuse_if_full(job.owner)  # again: another upload may have taken the last place meanwhile
            job = dataclasses.replace(job, seq=self._store.insert(job))
            self._active[job.id] = job
            self._positions = None
            self._changed.notify_all()  # it may come before a job that waits to start isolated
            return self._view(job)

    def recover(self) -> tuple[list[str], list[Job]]:
        """Queue again the jobs a dead process left unfinished, oldest first: (their ids, the jobs failed instead).

        Which of them is charged for the crash, fails, or runs isolated is the crash rule (crash_rule.py).
        """
        queued, failed = [], []
        with self._lock:
            for job in judge_and_store(self._store):  # memory after the verdicts' commit
                if job.status is JobStatus.FAILED:
                    failed.append(job)
                    log.warning("job %s failed: interrupted %d times", job.id, job.attempts)
                    continue
                self._active[job.id] = job
                self._positions = None
                queued.append(job.id)
                log.info("job %s queued again after restart (attempts %d)", job.id, job.attempts)
        return queued, failed

    # -- queries --------------------------------------------------------------------------

    def view(self, job_id: str) -> JobView:
        """The job and its queue position, as of one moment; JobNotFound if unknown."""
        with self._lock:
            job = self._active.get(job_id)
            if job is not None:
                return self._view(job)
        stored = self._store.get(job_id)
        if stored is None:
            raise JobNotFound(f"no job with id {job_id!r}")
        return JobView(stored)

    def views(self, status: JobStatus | None, owner: str | None, limit: int, offset: int) -> list[JobView]:
        """Jobs newest first (of one owner only, unless None), the active ones with their live state."""
        stored = self._store.list_jobs(status, owner, limit, offset)
        with self._lock:
            return [self._view(self._active.get(job.id, job)) for job in stored]

    def counts(self) -> QueueCounts:
        """Pending and running jobs now, and the capacity."""
        with self._lock:
            statuses = [job.status for job in self._active.values()]
        return QueueCounts(
            statuses.count(JobStatus.PENDING), statuses.count(JobStatus.IN_PROGRESS), self._limits.capacity
        )

    def _view(self, job: Job) -> JobView:
        # Caller holds the lock.
        if job.status is not JobStatus.PENDING or job.id not in self._active:
            return JobView(job)
        if self._positions is None:
            self._positions = self._turns.positions(self._active.values())
        return JobView(job, self._positions[job.id])

    # -- a job's life ---------------------------------------------------------------------

    def start_next(self) -> Job | None:
        """Mark the pending job whose turn it is as running (one more attempt); None if none is pending or closed.

        Jobs start in their queue order (rotation.py): round-robin over keys. An isolated job waits
        until nothing else runs, nothing starts beside it, and the jobs after it wait their turn.
        """
        with self._lock:
            while True:
                if not self._open:
                    return None  # stopping: pending jobs stay pending in the store
                order = self._turns.order(self._active.values())
                if not order:
                    return None  # its job was cancelled while queued, or another thread started it
                job = order[0]
                if may_start(job, self._active.values()):  # an isolated job runs alone (crash_rule.py)
                    break
                self._changed.wait()
            job = dataclasses.replace(
                job,
                status=JobStatus.IN_PROGRESS,
                stage=JobStage.DECODING_AUDIO,
                started_at=utcnow(),
                attempts=job.attempts + 1,
            )
            job = self._put(job, persist=True)
            self._turns.started(job.owner)
            return job

    def wait_until_ended(self, job_id: str, timeout: float | None) -> bool:
        """Wait at most `timeout` s for the job to end or the registry to close; whether the job ended."""
        with self._lock:
            self._changed.wait_for(lambda: job_id not in self._active or not self._open, timeout)
            return job_id not in self._active

    def abandon(self, job_id: str) -> None:
        """Forget a running job whose end the store refused; its stored record is left to the crash rule."""
        # The last resort of a pool thread: a job left in memory with no thread would hold its places
        # (capacity, its key's share) and keep every isolated job from starting, for ever.
        with self._lock:
            self._active.pop(job_id, None)
            self._positions = None
            self._changed.notify_all()
        log.error("job %s abandoned: its end could not be stored; the next start queues it again", job_id)

    def check_active(self, job_id: str) -> None:
        """Raise JobCancelled if the job has left the registry (cancelled)."""
        # Without the lock: every decoder step and every fetched chunk calls this, and the lock is
        # held across SQLite commits (fsync), so a step could wait on the disk. A dict lookup is
        # atomic, cancel() removes the job as soon as it has committed, and a stale read is
        # corrected by the next check.
        if job_id not in self._active:
            raise JobCancelled(job_id)

    def update(self, job_id: str, *, persist: bool = True, **changes: Any) -> Job:
        """Change a running job's fields (stored if `persist`); JobCancelled if it was cancelled."""
        with self._lock:
            job = self._active.get(job_id)
            if job is None:
                raise JobCancelled(job_id)
            return self._put(dataclasses.replace(job, **changes), persist)

    def finish(self, job_id: str, status: JobStatus, code: str | None = None, message: str | None = None) -> None:
        """End a running job; a job cancelled meanwhile keeps that final state.

        StorageFull if the store refuses the end: the job then stays active, as stored, to be finished again.
        """
        with self._lock:
            job = self._active.get(job_id)
            if job is not None:
                self._store.update(ended(job, status, code, message))
                del self._active[job_id]
                self._positions = None
            self._changed.notify_all()
        if job is None:
            return
        if status is JobStatus.COMPLETED:
            log.info("job %s completed", job_id)
        else:
            log.warning("job %s %s: %s", job_id, status.value, message)

    def put_back(self, job_id: str) -> None:
        """Return a job stopped by a graceful shutdown to pending; the stop costs it no attempt."""
        with self._lock:
            job = self._active.get(job_id)
            if job is None:
                return
            self._put(dataclasses.replace(pending_again(job), attempts=job.attempts - 1), persist=True)
            self._changed.notify_all()
        log.info("job %s back to pending for the next start", job_id)

    def cancel(self, job_id: str) -> tuple[Job, bool]:
        """Cancel a pending or running job: (its final record, whether it was pending). Ended jobs are unchanged."""
        with self._lock:
            job = self._active.get(job_id)
            if job is not None:
                cancelled = dataclasses.replace(job, status=JobStatus.CANCELLED, finished_at=utcnow(), eta_seconds=None)
                self._store.update(cancelled)  # StorageFull leaves the job as it was
                del self._active[job_id]
                self._positions = None
            self._changed.notify_all()
        if job is None:
            return self.view(job_id).job, False
        log.info("job %s cancelled", job_id)
        return cancelled, job.status is JobStatus.PENDING

    def _put(self, job: Job, persist: bool) -> Job:
        # Caller holds the lock. Stored first: if the store refuses, memory keeps what the store has.
        if persist:
            self._store.update(job)
        previous = self._active.get(job.id)
        if previous is None or previous.status is not job.status:  # started, or put back: the queue changed
            self._positions = None
        self._active[job.id] = job
        return job
