"""Starting and stopping the service's parts, in order, once (ARCHITECTURE.md, "Lifecycle")."""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable

from whisper_flask.exceptions import ShuttingDown
from whisper_flask.service.compose import Parts


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class Lifecycle:
    """Owns the order in which parts start and stop; a stopped service never starts again."""

    def __init__(self, parts: Parts, on_started: Callable[[], None] | None = None) -> None:
        self._parts = parts
        self._on_started = on_started  # run once everything has started (it may queue jobs)
        self._lock = threading.Lock()
        self._state = _State.NEW

    def start(self) -> None:
        """Load the model, start the runner and the sweeper, and queue again what a stop left; once."""
        if self._state is not _State.NEW:  # read without the lock: it only ever moves forward
            return
        parts = self._parts
        with self._lock:
            if self._state is not _State.NEW:
                return
            if parts.role.serves:
                parts.access.announce()
            # The stored jobs first: if they cannot be recovered nothing has started yet, and a later
            # start tries again from the same state.
            parts.registry.open()
            try:
                queued, failed = parts.registry.recover()
            except BaseException:
                parts.registry.close()
                raise
            if parts.role.runs_jobs:
                parts.engine.start(parts.settings)
            parts.runner.start(parts.pipeline.run)
            for job in failed:
                parts.retention.release(job)
            for job_id in queued:
                parts.runner.submit(job_id)
            if parts.role.serves:  # a cluster's workers leave the sweep and the notifications to the API nodes
                parts.retention.start()
                parts.notifier.start()
            if parts.cluster is not None:
                parts.cluster.start()
            self._state = _State.RUNNING
            if self._on_started is not None:
                self._on_started()

    def stop_jobs(self) -> None:
        """Stop starting jobs; running ones stop at their next decoder step and go back to pending (a worker's
        warm shutdown: Celery then waits for their runs to return before stop())."""
        self._parts.registry.close()

    def ensure_started(self) -> None:
        """Start on first use; ShuttingDown once stopped."""
        if self._state is _State.STOPPED:
            raise ShuttingDown("the service has stopped")
        self.start()

    def stop(self) -> None:
        """Stop taking work; running jobs stop at their next decoder step and go back to pending; close the store."""
        parts = self._parts
        with self._lock:
            if self._state is _State.STOPPED:
                return
            parts.registry.close()
            parts.runner.stop()
            if self._state is _State.RUNNING:
                if parts.cluster is not None:
                    parts.cluster.stop()
                if parts.role.serves:
                    parts.notifier.stop()
                    parts.retention.stop()
                if parts.role.runs_jobs:
                    parts.engine.stop()
            parts.store.close()
            parts.keys.close()
            self._state = _State.STOPPED
