"""Webhooks and e-mail when a job ends: real receivers on loopback, a real SMTP server, restarts."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiosmtpd.controller import Controller
from flask import Flask

from tests.helpers import FIXTURES, FakeEngine, base_config, eventually, keyed, sqlite_store, submit, upload, wait_for
from tests.servers import Receiver, free_port, serving
from whisper_flask import create_app
from whisper_flask.access.control import UNRESTRICTED
from whisper_flask.engine.options import TranscribeOptions
from whisper_flask.exceptions import StorageFull, TooManyNotifications
from whisper_flask.extension import get_service
from whisper_flask.jobs.records import Job, JobStatus, ended, utcnow
from whisper_flask.jobs.serialize import transcript_link
from whisper_flask.jobs.store import SqlJobStore
from whisper_flask.notify.notifier import POLL_S
from whisper_flask.notify.quota import NotifyQuota
from whisper_flask.settings import ConfigError

#: The job fields a webhook carried before its job became the /progress shape (jobs/serialize.py).
WEBHOOK_JOB_FIELDS = {"transcription_id", "status", "filename", "duration", "language", "options", "error",
                      "error_code", "created_at", "finished_at"}  # fmt: skip
PUBLIC_URL = "https://speech.example.org"
FAST_RETRIES = {
    "URL_ALLOW": "127.0.0.1/32",
    "NOTIFY_RETRY_BASE_S": 0.2,
    "NOTIFY_MAX_ATTEMPTS": 5,
    "PUBLIC_URL": PUBLIC_URL,
}


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    """Start receivers; each is stopped after the test."""
    with contextlib.ExitStack() as running:

        def start(statuses: list[int], delay_s: float = 0) -> Receiver:
            return running.enter_context(serving(Receiver(statuses, delay_s)))

        yield start


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
    make_app: Callable[..., Flask], receiver: Callable[..., Receiver]
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
    make_app: Callable[..., Flask], receiver: Callable[..., Receiver]
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
    eventually(
        lambda: restarted.view_with_notifications(job_id, UNRESTRICTED)[1][0].state.value == "delivered", timeout=30
    )
    assert len(hook.calls) == 2


def test_a_callback_to_loopback_is_refused_by_default_without_a_request(
    make_app: Callable[..., Flask], receiver: Callable[..., Receiver]
) -> None:
    hook = receiver([])
    client = make_app(NOTIFY_RETRY_BASE_S=0.2, PUBLIC_URL=PUBLIC_URL).test_client()
    job_id = upload(client, FIXTURES / "fox.wav", callback_url=hook.url).get_json()["transcription_id"]
    refused = delivery(client, job_id, "failed")
    assert refused["attempts"] == 1, "a refused address is not tried again"
    assert "127.0.0.1 is not a public address" in refused["last_error"]
    assert hook.calls == []


def test_cancelled_jobs_are_announced_too(
    make_app: Callable[..., Flask], engine: Any, receiver: Callable[..., Receiver]
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
    client = make_app(SMTP_HOST="127.0.0.1", PUBLIC_URL=PUBLIC_URL).test_client()
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
    response = upload(make_app(PUBLIC_URL=PUBLIC_URL).test_client(), FIXTURES / "fox.wav", **fields)
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
    client = make_app(**settings, NOTIFY_RETRY_BASE_S=0.5, PUBLIC_URL=PUBLIC_URL).test_client()
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
    assert (message["From"], message["Subject"]) == ("speech@example.org", f"Transcription completed: job {job_id}")
    text = message.get_payload(decode=True).decode()
    assert f"{PUBLIC_URL}/download/{job_id}.txt?expires=" in text


# -- links, addresses and what a client may shape ---------------------------------------------------


def test_links_start_with_public_url_whatever_host_the_upload_was_sent_to(
    make_app: Callable[..., Flask], receiver: Callable[..., Receiver]
) -> None:
    hook = receiver([])
    client = make_app(**{**FAST_RETRIES, "PUBLIC_URL": "https://speech.example.org/speech/"}).test_client()
    data = {"file": (io.BytesIO((FIXTURES / "fox.wav").read_bytes()), "fox.wav"), "callback_url": hook.url}
    response = client.post("/upload", data=data, headers={"Host": "evil.example", "X-Forwarded-Host": "evil.example"})
    job_id = response.get_json()["transcription_id"]
    assert "evil" not in response.get_data(as_text=True) + str(response.headers), "the 202's links are relative"
    delivery(client, job_id, "delivered")
    assert "evil" not in client.get(f"/progress/{job_id}", headers={"Host": "evil.example"}).get_data(as_text=True)
    payload = json.loads(hook.calls[0][1])
    assert payload["links"] and all(
        link.startswith(f"https://speech.example.org/speech/download/{job_id}.") for link in payload["links"].values()
    )
    assert b"evil" not in hook.calls[0][1]


@pytest.mark.parametrize("field", ["callback_url", "email"])
def test_without_public_url_a_callback_or_an_email_is_refused_naming_the_setting(
    make_app: Callable[..., Flask], field: str
) -> None:
    client = make_app(SMTP_HOST="127.0.0.1", URL_ALLOW="127.0.0.1").test_client()
    value = "http://127.0.0.1:9/hook" if field == "callback_url" else "alice@example.com"
    response = upload(client, FIXTURES / "fox.wav", **{field: value})
    body = response.get_json()
    assert (response.status_code, body["code"], body["field"]) == (400, "invalid_option", field)
    assert "PUBLIC_URL" in body["error"] and "must be set" in body["error"]


@pytest.mark.parametrize(
    "value",
    ["speech.example.org", "/speech", "ftp://speech.example.org", "https://", "https://speech.example.org/?a=1",
     "https://speech.example.org/#top", "https://user:pw@speech.example.org", "https://speech.example.org:port",
     "https://speech example.org"],
)  # fmt: skip
def test_a_public_url_that_is_not_an_absolute_http_url_refuses_to_start(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="WHISPER_FLASK_PUBLIC_URL must be an absolute http"):
        create_app({**base_config(tmp_path), "PUBLIC_URL": value}, engine=FakeEngine())


def test_a_public_url_keeps_its_sub_path_without_the_trailing_slash(tmp_path: Path) -> None:
    app = create_app({**base_config(tmp_path), "PUBLIC_URL": "http://10.0.0.5:8000/speech/"}, engine=FakeEngine())
    assert get_service(app).settings.PUBLIC_URL == "http://10.0.0.5:8000/speech"


@pytest.mark.parametrize(
    "address",
    ["a@[127.0.0.1]", "a@[IPv6:::1]", "a@127.0.0.1", "a@127.1", "a@0x7f.1", "a@2130706433", "a@localhost", "a@b"],
)
def test_an_email_address_at_an_ip_address_or_address_literal_is_refused(
    make_app: Callable[..., Flask], address: str
) -> None:
    client = make_app(SMTP_HOST="127.0.0.1", PUBLIC_URL=PUBLIC_URL).test_client()
    response = upload(client, FIXTURES / "fox.wav", email=address)
    assert (response.status_code, response.get_json()["field"]) == (400, "email")


@pytest.mark.parametrize("address", ["alice@example.com", "a.b+c@mail.example.org", "bob@xn--bcher-kva.example"])
def test_an_email_address_at_a_domain_name_is_accepted(make_app: Callable[..., Flask], address: str) -> None:
    client = make_app(SMTP_HOST="127.0.0.1", SMTP_PORT=9, PUBLIC_URL=PUBLIC_URL).test_client()
    assert upload(client, FIXTURES / "fox.wav", email=address).status_code == 202


class _PrizeHandler(BaseHTTPRequestHandler):
    """A URL's server that answers 404 with a reason phrase of its choosing."""

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.send_response(404, "Claim your prize at evil.example")
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def prize_server() -> Iterator[str]:
    """The base URL of a _PrizeHandler server on loopback."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PrizeHandler)
    server.daemon_threads = True
    with serving(server):
        yield f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def mailbox() -> Iterator[tuple[int, Mailbox]]:
    """A running SMTP server on loopback (aiosmtpd): its port and what it received."""
    port, box = free_port(), Mailbox()
    server = Controller(box, hostname="127.0.0.1", port=port)
    server.start()
    yield port, box
    server.stop()


def test_an_email_carries_the_job_id_status_and_links_never_the_client_s_words(
    make_app: Callable[..., Flask], mailbox: tuple[int, Mailbox], prize_server: str
) -> None:
    port, box = mailbox
    settings = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": port, "SMTP_SECURITY": "none", "URL_ALLOW": "127.0.0.1"}
    client = make_app(**settings, PUBLIC_URL=PUBLIC_URL).test_client()
    sent = upload(client, FIXTURES / "fox.wav", "Claim your prize at evil.example.wav", email="alice@example.com")
    uploaded = sent.get_json()["transcription_id"]
    fetched = client.post("/upload", json={"url": f"{prize_server}/Claim-your-prize.wav", "email": "bob@example.com"})
    failed = fetched.get_json()["transcription_id"]
    for job_id in (uploaded, failed):
        delivery(client, job_id, "delivered")
    messages = {recipients[0]: message_from_bytes(raw) for recipients, raw in box.messages}
    completed, refused = messages["alice@example.com"], messages["bob@example.com"]
    assert (completed["Subject"], refused["Subject"]) == (
        f"Transcription completed: job {uploaded}",
        f"Transcription failed: job {failed}",
    )
    texts = {
        "completed": completed.get_payload(decode=True).decode(),
        "failed": refused.get_payload(decode=True).decode(),
    }
    assert f"{PUBLIC_URL}/download/{uploaded}.txt?expires=" in texts["completed"]
    assert "Error code: fetch_failed" in texts["failed"]
    for message, text in ((completed, texts["completed"]), (refused, texts["failed"])):
        assert "prize" not in (text + "".join(f"{name}: {value}" for name, value in message.items())).lower()


# -- how much, and in what order -------------------------------------------------------------------


def test_a_key_past_its_notifications_per_hour_gets_429_while_other_keys_and_plain_jobs_go_on(
    make_app: Callable[..., Flask],
) -> None:
    app = make_app(NOTIFY_PER_KEY_PER_HOUR=3, PUBLIC_URL=PUBLIC_URL)  # loopback is refused: no attempt leaves
    client, hook = app.test_client(), "http://127.0.0.1:9/hook"
    for _ in range(3):
        submit(client, FIXTURES / "fox.wav", callback_url=hook)
    refused = upload(client, FIXTURES / "fox.wav", callback_url=hook)
    assert (refused.status_code, refused.get_json()["code"]) == (429, "too_many_notifications")
    assert 3500 <= int(refused.headers["Retry-After"]) <= 3600
    submit(client, FIXTURES / "fox.wav")  # a job that asks for no notification is not counted
    submit(keyed(app, "other"), FIXTURES / "fox.wav", callback_url=hook)


def test_the_notification_quota_frees_places_as_the_hour_slides_and_counts_no_refused_job() -> None:
    now = [1000.0]
    quota = NotifyQuota(per_hour=2, clock=lambda: now[0])
    with pytest.raises(RuntimeError), quota.reserve("a", 1):
        raise RuntimeError("the job was not accepted")
    with quota.reserve("a", 1):
        pass
    now[0] += 600
    with quota.reserve("a", 1):
        pass
    with pytest.raises(TooManyNotifications) as refused, quota.reserve("a", 1):
        pass
    assert refused.value.retry_after == 3000, "the first place frees an hour after it was taken"
    now[0] += 3000
    with quota.reserve("a", 1):
        pass
    with pytest.raises(TooManyNotifications), quota.reserve("a", 2):
        pass


def test_a_key_s_slow_receivers_do_not_delay_another_key_s_webhook(
    make_app: Callable[..., Flask], receiver: Callable[..., Receiver]
) -> None:
    slow, fast = receiver([], delay_s=5), receiver([])
    app = make_app(**FAST_RETRIES)
    client = app.test_client()
    for _ in range(3):
        wait_for(client, submit(client, FIXTURES / "fox.wav", callback_url=slow.url))
    eventually(lambda: len(slow.calls) >= 1, timeout=10)  # the first of its three is being answered, slowly
    other = keyed(app, "other")
    job_id = submit(other, FIXTURES / "fox.wav", callback_url=fast.url)
    wait_for(other, job_id)
    ended = time.monotonic()
    delivery(other, job_id, "delivered", timeout=30)
    assert fast.answered[0] - ended < 2.5, "another key's webhook waits for no slow receiver"
    assert len(slow.answered) < 3


def test_stopping_the_service_joins_every_notifier_thread(make_app: Callable[..., Flask]) -> None:
    before = set(threading.enumerate())
    app = make_app(PUBLIC_URL=PUBLIC_URL)
    notifiers = [t for t in threading.enumerate() if t not in before and t.name.startswith("whisper-notifier")]
    assert len(notifiers) == 1 + 4, "a dispatcher and NOTIFY_CONCURRENCY senders"
    started = time.monotonic()
    get_service(app).stop()
    assert time.monotonic() - started < 5
    assert not [t for t in notifiers if t.is_alive()]


def test_the_outbox_offers_each_key_s_soonest_notification_so_no_backlog_hides_another_key(tmp_path: Path) -> None:
    store = sqlite_store(tmp_path / "jobs.sqlite3")
    try:
        for owner, count in (("a", 60), ("b", 1)):  # a's backlog is older than b's one webhook
            for _ in range(count):
                job = Job(id=uuid.uuid4().hex, filename="x.wav", upload_name="x.wav", options=TranscribeOptions(),
                          model="fake", owner=owner, callback_url="https://hooks.example.org/x")  # fmt: skip
                store.insert(job)
                store.update(ended(job, JobStatus.COMPLETED, None, None))
        due = store.due_notifications(utcnow(), limit=50)
        assert [(n.owner, n.kind.value) for n in due] == [("a", "webhook"), ("b", "webhook")]
    finally:
        store.close()


def test_a_webhook_whose_attempt_cannot_be_recorded_is_not_sent_again_at_every_round(
    make_app: Callable[..., Flask], receiver: Callable[..., Receiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    hook = receiver([])
    client = make_app(**FAST_RETRIES).test_client()

    def disk_full(store: SqlJobStore, notification: Any) -> None:
        raise StorageFull("database or disk is full")

    monkeypatch.setattr(SqlJobStore, "record_attempt", disk_full)
    submit(client, FIXTURES / "fox.wav", callback_url=hook.url)
    eventually(lambda: len(hook.calls) >= 1, timeout=30, message="the webhook was never sent")
    time.sleep(3 * POLL_S)  # three dispatcher rounds, each of which would have sent it again
    assert len(hook.calls) == 1
