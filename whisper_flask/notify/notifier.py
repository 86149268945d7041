"""Telling clients that a job ended: a signed webhook and an e-mail, delivered from the durable outbox.

The outbox is a table in the job database: a job's notifications are stored in the same
transaction that ends it (store.JobStore.update), so they survive any crash, and the Notifier
delivers them at least once, retrying with exponential backoff (ARCHITECTURE.md, "Notifications").

Attempts run on NOTIFY_CONCURRENCY sender threads, at most one per key at a time, and a free sender
goes to the key served longest ago. One attempt may take 30 s; so a key whose receivers are slow
holds one sender, never all of them, and another key's notification waits for no more than the
first sender to free up when every sender is busy with a different key. Per key rather than per
target host: a key can name any number of hosts, and many keys may share one receiving service.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from whisper_flask.exceptions import TransientStorageError
from whisper_flask.jobs.ports import JobStore
from whisper_flask.jobs.records import DeliveryState, Job, Notification, NotificationKind, iso, utcnow
from whisper_flask.notify import messages
from whisper_flask.notify.delivery import DeliveryFailed, post, send, smtp_settings
from whisper_flask.notify.quota import NotifyQuota
from whisper_flask.settings import Settings

log = logging.getLogger(__name__)

MAX_DELAY_S = 3600.0
POLL_S = 1.0
#: How long an attempt that could not be recorded (a full disk) waits before it is made again.
RECORD_RETRY_S = 60.0
STOP_TIMEOUT_S = 60.0  # an attempt is bounded (30 s for a webhook, SMTP's timeout for an e-mail)
DUE_LIMIT = 1000  # keys looked at per round: each key's soonest notification only


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts after the first wait base_s, doubling up to an hour; after max_attempts, give up."""

    base_s: float
    max_attempts: int

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failed attempt."""
        return min(self.base_s * 2 ** min(attempts - 1, 32), MAX_DELAY_S)


class Notifier:
    """Delivers due notifications: a dispatcher hands them to sender threads; it starts and stops them all."""

    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        webhook_secret: Callable[[str | None], str],
        links: Callable[[Job], dict[str, str]],
        claim: Callable[[Notification], bool] | None = None,
    ) -> None:
        self._store = store
        # In a cluster every API node runs a notifier: each notification is claimed in the database first,
        # so exactly one node sends it (its claim ends when the attempt is recorded, or after CLAIM_S).
        self._claim = claim
        self._allowed = settings.URL_ALLOW
        self._retry = RetryPolicy(settings.NOTIFY_RETRY_BASE_S, settings.NOTIFY_MAX_ATTEMPTS)
        self._smtp = smtp_settings(settings)
        self._webhook_secret = webhook_secret
        self._links = links
        self._concurrency = settings.NOTIFY_CONCURRENCY
        self._quota = NotifyQuota(settings.NOTIFY_PER_KEY_PER_HOUR)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._handed: queue.SimpleQueue[Notification | None] = queue.SimpleQueue()
        self._changed = threading.Condition()
        # Notifications handed to a sender and not yet recorded, with their keys. Only the dispatcher adds
        # to it, and a sender removes its notification after recording the attempt, so no notification is
        # ever handed twice at once.
        self._in_flight: dict[int, str | None] = {}
        self._freed = False
        self._served: dict[str | None, int] = {}  # when each key with due notifications was last handed one
        # Attempts made but not recorded (the store's disk is full): not handed again before this time, so a
        # full disk repeats a webhook once every RECORD_RETRY_S instead of at every round.
        self._unrecorded: dict[int, float] = {}
        self._turns = itertools.count(1)

    @property
    def sends_email(self) -> bool:
        """Whether SMTP is configured, so that jobs may ask for an e-mail."""
        return self._smtp is not None

    def reserve(self, owner: str | None, count: int) -> AbstractContextManager[None]:
        """Count `count` notifications against the key's hour (TooManyNotifications); undone if the block fails."""
        return self._quota.reserve(owner, count)

    def start(self) -> None:
        """Start delivering; notifications left by an earlier run go first."""
        self._threads = [threading.Thread(target=self._dispatch, name="whisper-notifier", daemon=True)]
        self._threads += [
            threading.Thread(target=self._send, name=f"whisper-notifier-{n}", daemon=True)
            for n in range(self._concurrency)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop after the attempts in hand; what is left is delivered after the next start."""
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        for _ in range(self._concurrency):
            self._handed.put(None)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def deliver_due(self) -> int:
        """Hand each free sender a due notification of a key not being served, least recently served first."""
        with self._changed:
            free = self._concurrency - len(self._in_flight)
            busy = set(self._in_flight.values())
        if free <= 0:
            return 0
        now = time.monotonic()
        due = [
            n
            for n in self._store.due_notifications(utcnow(), DUE_LIMIT)
            if n.owner not in busy and self._unrecorded.get(n.id, 0.0) <= now
        ]
        with self._changed:
            # Keys with nothing due are forgotten: the table stays as small as the keys that compete.
            self._served = {n.owner: self._served.get(n.owner, 0) for n in due} | {
                owner: self._served.get(owner, 0) for owner in busy
            }
            chosen = sorted(due, key=lambda n: self._served[n.owner])[:free]  # stable: soonest first among equals
        if self._claim is not None:  # a cluster: another API node may be sending it already
            chosen = [notification for notification in chosen if self._claim(notification)]
        with self._changed:
            for notification in chosen:
                self._in_flight[notification.id] = notification.owner
                self._served[notification.owner] = next(self._turns)
        for notification in chosen:
            self._handed.put(notification)
        return len(chosen)

    def _dispatch(self) -> None:
        while not self._stopping.is_set():
            try:
                self.deliver_due()
            except Exception:  # the store may be closing; the next round tries again
                log.exception("notification delivery failed")
            with self._changed:  # until a sender is free again, or the next round
                self._changed.wait_for(lambda: self._freed or self._stopping.is_set(), timeout=POLL_S)
                self._freed = False

    def _send(self) -> None:
        while (notification := self._handed.get()) is not None:
            try:
                if not self._stopping.is_set():  # else it stays pending in the outbox for the next start
                    self._attempt(notification)
                self._unrecorded.pop(notification.id, None)
            except TransientStorageError:
                self._unrecorded[notification.id] = time.monotonic() + RECORD_RETRY_S
                log.warning("notification %d: the attempt could not be recorded (storage full)", notification.id)
            except Exception:  # the store may be closing or busy; the notification is still due there
                self._unrecorded[notification.id] = time.monotonic() + RECORD_RETRY_S
                log.exception("notification %d: the attempt could not be recorded", notification.id)
            finally:
                with self._changed:
                    del self._in_flight[notification.id]
                    self._freed = True
                    self._changed.notify_all()

    def _attempt(self, notification: Notification) -> None:
        job = self._store.get(notification.job_id)
        attempts = notification.attempts + 1
        try:
            if job is None:
                raise DeliveryFailed("the job no longer exists", final=True)
            if notification.kind is NotificationKind.WEBHOOK:
                secret = self._webhook_secret(job.owner)
                body, headers = messages.webhook(notification, job, self._links(job), secret, int(time.time()))
                post(notification.target, body, headers, self._allowed)
            else:
                if self._smtp is None:
                    raise DeliveryFailed("this server has no SMTP_HOST any more", final=True)
                send(self._smtp, messages.mail(self._smtp.sender, notification, job, self._links(job)))
        except Exception as exc:  # whatever failed, this attempt is recorded: the queue must move on
            final = (isinstance(exc, DeliveryFailed) and exc.final) or attempts >= self._retry.max_attempts
            later = datetime.now(timezone.utc) + timedelta(seconds=self._retry.delay(attempts))
            outcome = dataclasses.replace(
                notification,
                state=DeliveryState.FAILED if final else DeliveryState.PENDING,
                attempts=attempts,
                next_attempt_at=notification.next_attempt_at if final else iso(later),
                last_error=str(exc),
            )
            log.warning("job %s: %s attempt %d failed: %s", notification.job_id, notification.kind.value, attempts, exc)
        else:
            outcome = dataclasses.replace(
                notification, state=DeliveryState.DELIVERED, attempts=attempts, last_error=None, delivered_at=utcnow()
            )
            log.info("job %s: %s delivered", notification.job_id, notification.kind.value)
        self._store.record_attempt(outcome)
