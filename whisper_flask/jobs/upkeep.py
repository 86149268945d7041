"""The cluster mode's two background loops: a worker's heartbeat, and the reconciler every node runs.

The heartbeat renews this worker's leases (and its row in `workers`) every HEARTBEAT_S; a job
whose lease it no longer holds was cancelled or taken over, and stops at its next decoder step.
The reconciler (one node at a time, under an advisory lock) puts back the jobs whose lease ran out,
judged by the crash rule per dead worker, and gives tickets for pending jobs the broker lost
(ARCHITECTURE.md, "Cluster").
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from whisper_flask.exceptions import TransientStorageError
from whisper_flask.jobs.celery_queue import CeleryRunner
from whisper_flask.jobs.crash_rule import after_crash, suspects
from whisper_flask.jobs.leases import RECONCILE_LOCK, Leases
from whisper_flask.jobs.ports import Fence, JobChanged, JobStore
from whisper_flask.jobs.records import Job, JobStatus
from whisper_flask.jobs.shared_registry import SharedRegistry

log = logging.getLogger(__name__)

#: A worker not heard from for this many leases is dropped from `workers` (GET /queue): it died without leaving.
WORKER_MEMORY_LEASES = 10
#: The heartbeat's longest period: a cancel reaches the job's worker within it (plus one decoder step).
HEARTBEAT_S = 1.0


class _Loop:
    """A daemon thread that calls `step` every `period` s until stopped; a failing step is logged, not fatal."""

    def __init__(self, name: str, period: float, step: Callable[[], None]) -> None:
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period, step), name=name, daemon=True)
        self._failing = False

    def _run(self, period: float, step: Callable[[], None]) -> None:
        while not self._stopping.wait(period):
            try:
                step()
            except Exception as exc:  # the database or the broker away (each client raises its own kinds)
                # The loop must outlive any failure: without it no dead worker's job would be taken over.
                if not self._failing:
                    log.warning("%s: %s; retrying every %.1f s", self._thread.name, type(exc).__name__, period,
                                exc_info=not isinstance(exc, SQLAlchemyError | TransientStorageError))  # fmt: skip
                self._failing = True
            else:
                if self._failing:
                    log.info("%s: working again", self._thread.name)
                self._failing = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(30)


class Heartbeat:
    """A worker's lease renewals and its row in `workers`, every HEARTBEAT_S."""

    def __init__(
        self, registry: SharedRegistry, leases: Leases, node: str, model: str, capacity: int, lease_s: float
    ) -> None:
        self._registry = registry
        self._leases = leases
        self._node = node
        self._model = model
        self._capacity = capacity
        # At least three beats per lease, so that one slow beat never lets a live worker's lease run out.
        self._loop = _Loop("whisper-heartbeat", min(HEARTBEAT_S, lease_s / 3), self.beat)

    def beat(self) -> None:
        """Renew the leases of this worker's jobs; jobs it no longer holds stop here."""
        running = self._registry.running_ids()
        held = self._leases.beat(self._node, running, self._model, self._capacity)
        self._registry.lost(set(running) - held)

    def start(self) -> None:
        """Start beating."""
        self._loop.start()

    def stop(self) -> None:
        """Stop beating and remove this worker from `workers` (its leases simply run out)."""
        self._loop.stop()
        try:
            self._leases.leave(self._node)
        except SQLAlchemyError:
            log.warning("this worker's row stays in `workers` until it is forgotten")


class Reconciler:
    """Takes over dead workers' jobs and re-sends tickets the broker lost; runs on every node, one at a time."""

    def __init__(
        self,
        store: JobStore,
        leases: Leases,
        runner: CeleryRunner,
        release: Callable[[Job], None],
        lease_s: float,
    ) -> None:
        self._store = store
        self._leases = leases
        self._runner = runner
        self._release = release
        self._forget_workers_after_s = WORKER_MEMORY_LEASES * lease_s
        # A third of a lease: a dead worker's jobs are queued again within about 1.3 leases of its death.
        self._loop = _Loop("whisper-reconciler", lease_s / 3, self.reconcile)

    def reconcile(self) -> None:
        """One round: expired leases judged and put back (or failed), then tickets topped up to the pending jobs."""
        with self._leases.holding(RECONCILE_LOCK) as connection:
            judged: list[Job] = []
            # The crash rule per dead worker: the jobs it ran are the ones that may have killed it. Its
            # verdicts are written at once, fenced: a job its worker ended meanwhile keeps its end.
            for worker, jobs in self._leases.expired(connection).items():
                verdicts = [after_crash(job, suspects(jobs)) for job in jobs]
                try:
                    self._store.update_all(verdicts, Fence((JobStatus.IN_PROGRESS,), worker))
                except JobChanged:
                    continue  # judged again next round, from what the worker left
                judged += verdicts
                log.warning("worker %s lost: its %d jobs are taken over", worker, len(jobs))
            pending = self._leases.pending_order(connection)
            self._leases.forget_workers(connection, self._forget_workers_after_s)
        for job in judged:
            if job.status is JobStatus.FAILED:
                self._release(job)
        missing = len(pending) - self._runner.waiting()
        for job in pending[len(pending) - missing :] if missing > 0 else []:
            self._runner.submit(job.id)
        if missing > 0:
            log.info("%d tickets given for pending jobs the queue did not hold", missing)

    def start(self) -> None:
        """Start reconciling every period."""
        self._loop.start()

    def stop(self) -> None:
        """Stop reconciling."""
        self._loop.stop()
