"""One attempt at one notification: POST a webhook to a checked address, or hand an e-mail to SMTP."""

from __future__ import annotations

import smtplib
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage

from whisper_flask.audio.fetch import FetchLimits, open_checked
from whisper_flask.exceptions import AddressRefused, FetchFailed
from whisper_flask.settings import IPNetwork, Settings

WEBHOOK_LIMITS = FetchLimits(max_bytes=0, total_s=30.0, connect_s=10.0, idle_s=20.0)
SMTP_TIMEOUT_S = 30


class DeliveryFailed(Exception):
    """One attempt failed; `final` when no later attempt could succeed."""

    def __init__(self, message: str, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


@dataclass(frozen=True)
class SmtpSettings:
    """How to send e-mail; security is "starttls", "tls" (SMTPS) or "none"."""

    host: str
    port: int
    security: str
    user: str
    password: str
    sender: str


def smtp_settings(settings: Settings) -> SmtpSettings | None:
    """The SMTP settings; None when SMTP_HOST is empty (no e-mail)."""
    if not settings.SMTP_HOST:
        return None
    return SmtpSettings(settings.SMTP_HOST, settings.SMTP_PORT, settings.SMTP_SECURITY, settings.SMTP_USER,
                        settings.SMTP_PASSWORD, settings.SMTP_FROM)  # fmt: skip


def post(url: str, body: bytes, headers: dict[str, str], allowed: Sequence[IPNetwork]) -> None:
    """POST a webhook within WEBHOOK_LIMITS; DeliveryFailed unless it answers 2xx (final for a refused address)."""
    deadline = time.monotonic() + WEBHOOK_LIMITS.total_s
    try:
        connection, response = open_checked(url, allowed, WEBHOOK_LIMITS, deadline, "POST", body, headers)
    except AddressRefused as exc:
        raise DeliveryFailed(str(exc), final=True) from None
    except FetchFailed as exc:
        raise DeliveryFailed(str(exc)) from None
    status, reason = response.status, response.reason
    connection.finish()
    if not 200 <= status < 300:  # a redirect is not followed: the receiver must answer itself
        raise DeliveryFailed(f"the receiver answered {status} {reason}")


def send(smtp: SmtpSettings, message: EmailMessage) -> None:
    """Hand the message to the mail server; DeliveryFailed if it refuses or cannot be reached."""
    try:
        client = smtplib.SMTP_SSL if smtp.security == "tls" else smtplib.SMTP
        with client(smtp.host, smtp.port, timeout=SMTP_TIMEOUT_S) as server:
            if smtp.security == "starttls":
                server.starttls(context=ssl.create_default_context())
            if smtp.user:
                server.login(smtp.user, smtp.password)
            server.send_message(message)
    except (smtplib.SMTPException, OSError) as exc:
        raise DeliveryFailed(f"the mail server refused or could not be reached: {exc}") from None
