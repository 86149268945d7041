"""Requests that hold an HTTP thread until their job ends (`/v1`): bounded, and answered when the server drains."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from whisper_flask.access.control import Principal
from whisper_flask.exceptions import ShuttingDown
from whisper_flask.jobs.ports import Registry
from whisper_flask.jobs.records import Job
from whisper_flask.service.owned import OwnedJobs
from whisper_flask.service.slots import RequestSlots

#: How often a request waiting for a job looks whether the server is stopping (drain()).
DRAIN_POLL_S = 1.0


class JobWaits:
    """Waits for jobs to end, at most MAX_WAITING_REQUESTS at once, and gives up when the server drains."""

    def __init__(self, registry: Registry, owned: OwnedJobs, slots: RequestSlots) -> None:
        self._registry = registry
        self._owned = owned
        self._slots = slots
        self._draining = threading.Event()

    def drain(self) -> None:
        """The server is stopping: waiting requests answer now (ShuttingDown)."""
        # Called from a signal handler: an Event, no lock. Waits look at it at least every second.
        self._draining.set()

    def hold_slot(self) -> Callable[[], None]:
        """Take a place (Busy if none is free); call what it returns to give it back."""
        self._slots.take()
        return self._slots.give

    def wait(self, job_id: str, principal: Principal, timeout: float | None = None) -> Job:
        """The job once it has ended, or as it stands after `timeout` s; ShuttingDown if the service stops first."""
        # Ownership is checked once: a stream calls this every half second, and the answer cannot change.
        self._owned.view(job_id, principal)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = DRAIN_POLL_S if deadline is None else min(DRAIN_POLL_S, deadline - time.monotonic())
            if self._registry.wait_until_ended(job_id, max(0.0, left)):
                return self._registry.view(job_id).job
            if self._draining.is_set() or not self._registry.accepting:
                raise ShuttingDown(f"the service is stopping; job {job_id} resumes after the restart")
            if deadline is not None and time.monotonic() >= deadline:
                return self._registry.view(job_id).job
