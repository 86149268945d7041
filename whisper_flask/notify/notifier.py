"""Telling clients that a job ended: a signed webhook and an e-mail, delivered from the durable outbox.

The outbox is a table in the job database: a job's notifications are stored in the same
transaction that ends it (store.JobStore.update), so they survive any crash, and the Notifier
delivers them at least once, retrying with exponential backoff (ARCHITECTURE.md, "Notifications").
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import smtplib
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import make_msgid

from whisper_flask.access.control import LinkSigner
from whisper_flask.audio.fetch import FetchLimits, check_url, open_checked
from whisper_flask.exceptions import AddressRefused, FetchFailed, InvalidOption
from whisper_flask.jobs.ports import JobStore
from whisper_flask.jobs.records import (
    DeliveryState,
    Job,
    JobStatus,
    JobView,
    Notification,
    NotificationKind,
    NotifyTargets,
    iso,
    utcnow,
)
from whisper_flask.jobs.serialize import job_body, transcript_link
from whisper_flask.jobs.writers import FORMATS
from whisper_flask.settings import IPNetwork, Settings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Whisper-Flask-Signature"
MAX_DELAY_S = 3600.0
POLL_S = 1.0
STOP_TIMEOUT_S = 60.0
WEBHOOK_LIMITS = FetchLimits(max_bytes=0, total_s=30.0, connect_s=10.0, idle_s=20.0)
MAX_EMAIL_CHARS = 254
#: The request fields that ask to be told when a job ends; api/describe.py documents these.
TARGET_FIELDS = ("callback_url", "email")


@dataclass(frozen=True)
class SmtpSettings:
    """How to send e-mail; security is "starttls", "tls" (SMTPS) or "none"."""

    host: str
    port: int
    security: str
    user: str
    password: str
    sender: str


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts after the first wait base_s, doubling up to an hour; after max_attempts, give up."""

    base_s: float
    max_attempts: int

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failed attempt."""
        return min(self.base_s * 2 ** min(attempts - 1, 32), MAX_DELAY_S)


class DeliveryFailed(Exception):
    """One attempt failed; `final` when no later attempt could succeed."""

    def __init__(self, message: str, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


def parse_targets(sources: list[Mapping[str, str]], link_base: str, email_enabled: bool) -> NotifyTargets:
    """`callback_url` and `email` from form fields, JSON or the query; InvalidOption names a bad one."""
    fields = {name: next((s[name] for s in sources if s.get(name)), None) for name in TARGET_FIELDS}
    callback_url, email = fields["callback_url"], fields["email"]
    if callback_url is not None:
        check_url(callback_url, field="callback_url")
    if email is not None:
        if not email_enabled:
            raise InvalidOption("email", "this server sends no e-mail (its SMTP_HOST is not set)")
        try:
            address = Address(addr_spec=email)
        except Exception:  # email's parser raises HeaderParseError, AttributeError, ... on odd input
            address = None
        if address is None or not address.domain or len(email) > MAX_EMAIL_CHARS:
            raise InvalidOption("email", "not an e-mail address")
    if callback_url is None and email is None:
        return NotifyTargets()
    return NotifyTargets(callback_url, email, link_base.rstrip("/"))


def smtp_settings(settings: Settings) -> SmtpSettings | None:
    """The SMTP settings; None when SMTP_HOST is empty (no e-mail)."""
    if not settings.SMTP_HOST:
        return None
    return SmtpSettings(settings.SMTP_HOST, settings.SMTP_PORT, settings.SMTP_SECURITY, settings.SMTP_USER,
                        settings.SMTP_PASSWORD, settings.SMTP_FROM)  # fmt: skip


def download_links(signer: LinkSigner, job: Job) -> dict[str, str]:
    """A completed job's signed transcript links, absolute, in every format; none for other jobs."""
    if job.status is not JobStatus.COMPLETED or not job.link_base:
        return {}
    # A test follows these links to the transcript.
    return {fmt: job.link_base + transcript_link(job.id, fmt, signer.sign(job.id, fmt)) for fmt in FORMATS}


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


class Notifier:
    """Delivers due notifications on its own thread, which it starts and stops."""

    def __init__(
        self,
        store: JobStore,
        allowed: Sequence[IPNetwork],
        retry: RetryPolicy,
        smtp: SmtpSettings | None,
        webhook_secret: Callable[[str | None], str],
        links: Callable[[Job], dict[str, str]],
    ) -> None:
        self._store = store
        self._allowed = allowed
        self._retry = retry
        self._smtp = smtp
        self._webhook_secret = webhook_secret
        self._links = links
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def sends_email(self) -> bool:
        """Whether SMTP is configured, so that jobs may ask for an e-mail."""
        return self._smtp is not None

    def start(self) -> None:
        """Start delivering; notifications left by an earlier run go first."""
        self._thread = threading.Thread(target=self._run, name="whisper-notifier", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the attempt in hand; what is left is delivered after the next start."""
        self._stopping.set()
        if self._thread is not None:
            # An attempt is bounded (a webhook by WEBHOOK_LIMITS.total_s, SMTP by its timeout).
            self._thread.join(timeout=STOP_TIMEOUT_S)

    def deliver_due(self) -> None:
        """Make one attempt at every notification whose time has come."""
        for notification in self._store.due_notifications(utcnow(), limit=50):
            if self._stopping.is_set():
                return
            self._attempt(notification)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.deliver_due()
            except Exception:  # the store may be closing; the next round tries again
                log.exception("notification delivery failed")
            self._stopping.wait(POLL_S)

    def _attempt(self, notification: Notification) -> None:
        job = self._store.get(notification.job_id)
        attempts = notification.attempts + 1
        try:
            if job is None:
                raise DeliveryFailed("the job no longer exists", final=True)
            if notification.kind is NotificationKind.WEBHOOK:
                self._post(notification, job)
            else:
                self._mail(notification, job)
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

    def _post(self, notification: Notification, job: Job) -> None:
        links = self._links(job)
        body = json.dumps(
            {
                "event": f"job.{job.status.value}",
                "delivery_id": notification.id,
                "job": job_body(JobView(job), links),  # the job as /progress shows it
                "links": links,
            }
        ).encode()
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self._webhook_secret(job.owner), timestamp, body),
            "X-Whisper-Flask-Delivery": str(notification.id),
        }
        deadline = time.monotonic() + WEBHOOK_LIMITS.total_s
        try:
            connection, response = open_checked(
                notification.target, self._allowed, WEBHOOK_LIMITS, deadline, "POST", body, headers
            )
        except AddressRefused as exc:
            raise DeliveryFailed(str(exc), final=True) from None
        except FetchFailed as exc:
            raise DeliveryFailed(str(exc)) from None
        status, reason = response.status, response.reason
        connection.finish()
        if not 200 <= status < 300:  # a redirect is not followed: the receiver must answer itself
            raise DeliveryFailed(f"the receiver answered {status} {reason}")

    def _mail(self, notification: Notification, job: Job) -> None:
        if self._smtp is None:
            raise DeliveryFailed("this server has no SMTP_HOST any more", final=True)
        smtp = self._smtp
        message = EmailMessage()
        message["From"] = smtp.sender
        message["To"] = notification.target
        message["Subject"] = f"Transcription {job.status.value}: {job.filename}"
        message["Message-ID"] = make_msgid(domain=smtp.sender.rpartition("@")[2] or None)
        message.set_content(_mail_text(job, self._links(job)))
        try:
            client = smtplib.SMTP_SSL if smtp.security == "tls" else smtplib.SMTP
            with client(smtp.host, smtp.port, timeout=30) as server:
                if smtp.security == "starttls":
                    server.starttls(context=ssl.create_default_context())
                if smtp.user:
                    server.login(smtp.user, smtp.password)
                server.send_message(message)
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryFailed(f"the mail server refused or could not be reached: {exc}") from None


def _mail_text(job: Job, links: dict[str, str]) -> str:
    lines = [f"The transcription of {job.filename} is {job.status.value}.", ""]
    if job.error:
        lines += [f"Reason: {job.error}", ""]
    if links:
        lines += ["Download it (the links work without a key until they expire):"]
        lines += [f"  {fmt}: {url}" for fmt, url in links.items()]
        lines.append("")
    lines.append(f"Job id: {job.id}")
    return "\n".join(lines) + "\n"
