"""The cluster mode's JobRunner: tickets as Celery tasks on the broker (ARCHITECTURE.md, "Cluster").

A ticket says "a job is waiting"; the worker that takes it claims the pending job whose turn it is
(leases.py), so a ticket delivered twice, or one too many, finds nothing to claim and returns. The
broker's delivery guarantees therefore never decide whether a job runs twice: the lease does. What
the broker loses (a restart without persistence) the reconciler gives again (upkeep.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery

from whisper_flask.settings import Settings

log = logging.getLogger(__name__)

#: The task every worker runs, and the queue its tickets wait in.
TASK = "whisper_flask.run_ticket"
QUEUE = "whisper-flask"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery's settings for the API nodes (which send tickets) and the workers (which run them)."""
    return {
        "broker_url": settings.BROKER_URL,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": QUEUE,
        "task_ignore_result": True,
        # Acknowledged when its run returns, so a ticket whose worker died is not lost with it; a
        # ticket's run takes as long as a job, so each worker thread reserves one ticket at a time.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # `celery -A whisper_flask.worker worker` alone must run one process per machine: one model,
        # one model thread, MAX_WORKERS jobs at once on threads (the prefork default would load a
        # model per CPU).
        "worker_pool": "threads",
        "worker_concurrency": settings.MAX_WORKERS,
        # Redis gives an unacknowledged ticket again after this (celery#5935): a job runs for hours, and
        # a second delivery is harmless (the lease decides), so it is long; a dead worker's job does
        # not wait for it either, the reconciler queues it once its lease runs out.
        "broker_transport_options": {"visibility_timeout": 12 * 3600},
        # A broker that goes away mid-job must not stop the jobs: their state is in the database.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_hijack_root_logger": False,
    }


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured for this cluster (not the current app: tests build several)."""
    app = Celery("whisper_flask", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


class CeleryRunner:
    """Hands tickets to the broker; the workers' Celery threads run them."""

    def __init__(self, app: Celery) -> None:
        self._app = app

    def start(self, run: Callable[[str], None]) -> None:
        """Nothing to start: Celery's worker, not this runner, calls `run` (whisper_flask/worker.py)."""

    def submit(self, job_id: str) -> None:
        """Send a ticket; if the broker is away, the job stays pending and the reconciler sends one later."""
        try:
            self._app.send_task(TASK, args=[job_id], queue=QUEUE, retry=False)
        except Exception as exc:  # noqa: BLE001 - kombu raises many kinds; the job is durable either way
            log.warning("ticket for job %s not sent (%s); the reconciler sends it later", job_id, type(exc).__name__)

    def waiting(self) -> int:
        """Tickets waiting in the broker's queue now (not those a worker holds)."""
        with self._app.connection_for_read() as connection:
            queue = self._app.amqp.queues[QUEUE].bind(connection.default_channel)
            return int(queue.queue_declare().message_count)

    def reachable(self) -> bool:
        """Whether the broker answers now."""
        try:
            with self._app.connection_for_read() as connection:
                connection.ensure_connection(max_retries=1, timeout=2)
        except Exception:  # noqa: BLE001 - any failure to connect means "not reachable"
            return False
        return True

    def stop(self) -> None:
        """Close the broker connections this runner opened."""
        self._app.close()
