"""The one-process JobRunner: a bounded pool of threads in this process (ARCHITECTURE.md, "Ports")."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)


class PoolRunner:
    """Runs handed tickets on at most `workers` threads; which job a free thread starts is the registry's choice."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._run: Callable[[str], None] | None = None

    def start(self, run: Callable[[str], None]) -> None:
        """Start the pool; each handed ticket runs as `run(job_id)` on the next free thread."""
        self._run = run
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="whisper-job")

    def submit(self, job_id: str) -> None:
        """Queue a ticket for the next free thread (the executor's queue holds tickets, not an order of jobs)."""
        assert self._executor is not None and self._run is not None  # the registry takes jobs only once started
        try:
            self._executor.submit(self._run, job_id)
        except RuntimeError:  # stop() shut the pool after the registry took the job: it is durable
            log.info("job %s will run after the restart", job_id)

    def stop(self) -> None:
        """Drop jobs not yet started (they stay pending in the store) and wait for the running ones."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
