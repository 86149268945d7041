"""Webhooks and e-mail when a job ends: real receivers on loopback, a real SMTP server, restarts."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiosmtpd.controller import Controller
from flask import Flask

from tests.helpers import FIXTURES, eventually, upload, wait_for
from tests.servers import free_port
from whisper_flask.access.control import UNRESTRICTED
from whisper_flask.extension import get_service
from whisper_flask.jobs.serialize import transcript_link

#: The job fields a webhook carried before its job became the /progress shape (jobs/serialize.py).
WEBHOOK_JOB_FIELDS = {"transcription_id", "status", "filename", "duration", "language", "options", "error",
                      "error_code", "created_at", "finished_at"}  # fmt: skip
FAST_RETRIES = {"URL_ALLOW": "127.0.0.1/32", "NOTIFY_RETRY_BASE_S": 0.2, "NOTIFY_MAX_ATTEMPTS": 5}


class Receiver(ThreadingHTTPServer):
    """A webhook receiver on loopback that answers the scripted statuses in turn, then 200."""

    daemon_threads = True

    def __init__(self, statuses: list[int]) -> None:
        super().__init__(("127.0.0.1", 0), _ReceiverHandler)
        self.statuses = statuses
        self.calls: list[tuple[dict[str, str], bytes]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hooks/whisper"


class _ReceiverHandler(BaseHTTPRequestHandler):
    server: Receiver

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.calls.append((dict(self.headers), body))
        self.send_response(self.server.statuses.pop(0) if self.server.statuses else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def receiver() -> Iterator[Callable[[list[int]], Receiver]]:
    """Start receivers; each is stopped after the test."""
    started: list[Receiver] = []

    def start(statuses: list[int]) -> Receiver:
        server = Receiver(statuses)
        # shutdown() waits for serve_forever's next poll: 0.5 s by default, after every test.
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def verify(secret: str, header: str, body: bytes, tolerance_s: int = 300) -> bool:
    """What a receiver does with X-Whisper-Flask-Signature (README, "Webhooks"), written from the docs."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    timestamp = int(fields["t"])
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return abs(time.time() - timestamp) <= tolerance_s and hmac.compare_digest(expected, fields["v1"])


def delivery(client: Any, job_id: str, state: str, timeout: float = 30) -> dict[str, Any]:
    """Wait until the job's first notification is in `state`; return it."""
    deadline = time.monotonic() + timeout
    while True:
        notifications = client.get(f"/jobs/{job_id}").get_json()["notifications"]
        if notifications and notifications[0]["state"] == state:
            return dict(notifications[0])
        assert time.monotonic() < deadline, notifications
        time.sleep(0.05)


def test_a_webhook_that_fails_twice_is_delivered_the_third_time_signed_for_its_key(
    make_app: Callable[..., Flask], receiver: Callable[[list[int]], Receiver]
) -> None:
    hook = receiver([500, 503])
    client = make_app(**FAST_RETRIES).test_client()
    job_id = upload(client, FIXTURES / "fox.wav", callback_url=hook.url).get_json()["transcription_id"]
    sent = delivery(client, job_id, "delivered")
    assert (sent["kind"], sent["target"], sent["attempts"], sent["last_error"]) == ("webhook", hook.url, 3, None)
    assert len(hook.calls) == 3
    assert len({headers["X-Whisper-Flask-Delivery"] for headers, _ in hook.calls}) == 1, "one id to deduplicate by"
    secret = client.get("/webhook-secret").get_json()["secret"]
    for headers, body in hook.calls:
        assert verify(secret, headers["X-Whisper-Flask-Signature"], body)
        assert not verify(secret, headers["X-Whisper-Flask-Signature"], body.replace(b"fox", b"cat"))
    other_key = make_app(**FAST_RETRIES).test_client().get("/webhook-secret").get_json()["secret"]
    assert not verify(other_key, hook.calls[0][0]["X-Whisper-Flask-Signature"], hook.calls[0][1])
    payload = json.loads(hook.calls[-1][1])
    assert (payload["event"], payload["job"]["transcription_id"], payload["job"]["filename"]) == (
        "job.completed",
        job_id,
        "fox.wav",
    )
    assert WEBHOOK_JOB_FIELDS <= set(payload["job"])
    assert (payload["job"]["error"], payload["job"]["formats"]) == (None, payload["links"])
    link = urlsplit(payload["links"]["txt"])
    assert client.get(f"{link.path}?{link.query}").status_code == 200, "the signed link opens the transcript"
    progress = client.get(f"/progress/{job_id}").get_json()
    assert set(progress) == set(payload["job"]), "a webhook's job is the job /progress shows"


def test_a_transcript_link_is_the_route_that_serves_transcripts(app: Flask) -> None:
    path = urlsplit(transcript_link("0" * 32, "srt", {"expires": "1", "signature": "x"})).path
    endpoint, arguments = app.url_map.bind("localhost").match(path)
    assert (endpoint, arguments) == ("transcription.download_transcript", {"job_id": "0" * 32, "fmt": "srt"})


def test_a_restart_between_attempts_still_delivers_the_webhook(
    make_app: Callable[..., Flask], receiver: Callable[[list[int]], Receiver]
) -> None:
    hook = receiver([500])
    settings = {**FAST_RETRIES, "NOTIFY_RETRY_BASE_S": 2}
    first = make_app(**settings)
    client = first.test_client()
    job_id = upload(client, FIXTURES / "fox.wav", callback_url=hook.url).get_json()["transcription_id"]
    failed_once = delivery(client, job_id, "pending")
    eventually(lambda: len(hook.calls) == 1)
    get_service(first).stop()
    assert failed_once["attempts"] in (0, 1)
    restarted = get_service(make_app(**settings))
    eventually(lambda: restarted.notifications(job_id, UNRESTRICTED)[0].state.value == "delivered", timeout=30)
    assert len(hook.calls) == 2


def test_a_callback_to_loopback_is_refused_by_default_without_a_request(
    make_app: Callable[..., Flask], receiver: Callable[[list[int]], Receiver]
) -> None:
    hook = receiver([])
    client = make_app(NOTIFY_RETRY_BASE_S=0.2).test_client()
    job_id = upload(client, FIXTURES / "fox.wav", callback_url=hook.url).get_json()["transcription_id"]
    refused = delivery(client, job_id, "failed")
    assert refused["attempts"] == 1, "a refused address is not tried again"
    assert "127.0.0.1 is not a public address" in refused["last_error"]
    assert hook.calls == []


def test_cancelled_jobs_are_announced_too(
    make_app: Callable[..., Flask], engine: Any, receiver: Callable[[list[int]], Receiver]
) -> None:
    hook = receiver([])
    client = make_app(**FAST_RETRIES).test_client()
    engine.gate.clear()  # the job stays in its first window until cancelled
    job_id = upload(client, FIXTURES / "fox.wav", callback_url=hook.url).get_json()["transcription_id"]
    assert client.delete(f"/jobs/{job_id}").get_json()["status"] == "cancelled"
    delivery(client, job_id, "delivered")
    engine.gate.set()
    payload = json.loads(hook.calls[0][1])
    assert (payload["event"], payload["links"]) == ("job.cancelled", {})
    assert WEBHOOK_JOB_FIELDS <= set(payload["job"]) and "formats" not in payload["job"]


@pytest.mark.parametrize("address", ["@", "@b", "<a@b>", "a@b@c", "a@[", "a", "a@b\r\nBcc: c@d"])
def test_a_malformed_email_address_is_refused_at_upload(make_app: Callable[..., Flask], address: str) -> None:
    client = make_app(SMTP_HOST="127.0.0.1").test_client()
    response = upload(client, FIXTURES / "fox.wav", email=address)
    assert (response.status_code, response.get_json()["field"]) == (400, "email")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"callback_url": "ftp://127.0.0.1/hook"}, "callback_url"),
        ({"callback_url": "http://user:pw@127.0.0.1/hook"}, "callback_url"),
        ({"callback_url": "http://127.0.0.1/hooks/é"}, "callback_url"),  # http.client could not send it
        ({"email": "alice@example.com"}, "email"),  # this app has no SMTP_HOST
    ],
)
def test_a_bad_callback_or_an_email_without_smtp_is_refused_at_upload(
    make_app: Callable[..., Flask], fields: dict[str, str], field: str
) -> None:
    response = upload(make_app().test_client(), FIXTURES / "fox.wav", **fields)
    assert (response.status_code, response.get_json()["field"]) == (400, field)


class Mailbox:
    """An aiosmtpd handler that keeps every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


@pytest.mark.slow  # a real SMTP server (aiosmtpd), and retries a second apart
def test_an_email_goes_out_once_the_mail_server_is_up_with_the_transcript_links(
    make_app: Callable[..., Flask],
) -> None:
    port = free_port()
    settings = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": port, "SMTP_SECURITY": "none", "SMTP_FROM": "speech@example.org"}
    client = make_app(**settings, NOTIFY_RETRY_BASE_S=0.5).test_client()
    job_id = upload(client, FIXTURES / "fox.wav", email="alice@example.com").get_json()["transcription_id"]
    assert wait_for(client, job_id)["email"] == "alice@example.com"
    refused = delivery(client, job_id, "pending")
    eventually(lambda: client.get(f"/jobs/{job_id}").get_json()["notifications"][0]["attempts"] >= 1)
    assert refused["kind"] == "email"
    mailbox = Mailbox()
    server = Controller(mailbox, hostname="127.0.0.1", port=port)
    server.start()
    try:
        sent = delivery(client, job_id, "delivered")
    finally:
        server.stop()
    assert sent["attempts"] >= 2
    ((recipients, raw),) = mailbox.messages
    message = message_from_bytes(raw)
    assert recipients == ["alice@example.com"]
    assert (message["From"], message["Subject"]) == ("speech@example.org", "Transcription completed: fox.wav")
    text = message.get_payload()
    assert f"/download/{job_id}.txt?expires=" in text
