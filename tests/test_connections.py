"""Request bodies on the wire: they must keep arriving, and an answer sent before one's end closes the connection."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from flask import Flask

from tests.helpers import FIXTURES, LiveClient, create_key, upload, wav_bytes
from tests.servers import Servers

BODY_TIMEOUT_S = 3
HTTP_THREADS = 4


@pytest.fixture(scope="module")
def served(module_servers: Servers) -> dict[str, Any]:
    """Real gunicorn with a 3 s body bound, 4 HTTP threads and one waiting slot."""
    key = create_key(module_servers.work, "user")
    port, _ = module_servers.gunicorn(
        BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
        HTTP_THREADS=str(HTTP_THREADS),
        MAX_WAITING_REQUESTS="1",
        AUTH_FAILURES_PER_MINUTE="100",  # wrong keys are what two tests send
    )
    return {"port": port, "key": key}


class SlowSender:
    """A raw HTTP/1.1 request whose body is sent one byte a second, on a thread, until the server answers."""

    def __init__(self, port: int, path: str, key: str, length: int = 100_000) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {length}\r\n\r\n")  # fmt: skip
        self.sock.sendall(head.encode() + b"-")
        self.started = time.monotonic()
        self.answer = b""
        self.answered_after: float | None = None
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self._reader.start()

    def _trickle(self) -> None:
        while self.answered_after is None:
            time.sleep(1)
            try:
                self.sock.send(b"-")
            except OSError:
                return

    def _read(self) -> None:
        try:
            while chunk := self.sock.recv(65536):
                self.answer += chunk
                if self.answered_after is None:
                    self.answered_after = time.monotonic() - self.started
        except OSError:
            pass

    def wait(self, timeout: float) -> bytes:
        """The server's answer once the connection closes (within `timeout` s)."""
        self._reader.join(timeout)
        assert not self._reader.is_alive(), f"no answer within {timeout} s"
        self.sock.close()
        return self.answer


@pytest.fixture
def slow_senders() -> Iterator[Callable[..., SlowSender]]:
    """Start slow senders; every socket is closed after the test."""
    started: list[SlowSender] = []

    def start(*args: Any) -> SlowSender:
        started.append(SlowSender(*args))
        return started[-1]

    yield start
    for sender in started:
        sender.sock.close()


def test_bodies_sent_a_byte_a_second_get_408_and_leave_threads_for_healthz(
    served: dict[str, Any], slow_senders: Callable[..., SlowSender]
) -> None:
    senders = [slow_senders(served["port"], "/upload", served["key"]) for _ in range(HTTP_THREADS)]
    time.sleep(1)  # every HTTP thread now reads a body
    began = time.monotonic()
    assert LiveClient(served["port"]).get("/healthz").status_code == 200
    assert time.monotonic() - began < BODY_TIMEOUT_S + 5, "/healthz waited for more than the body bound"
    for sender in senders:
        answer = sender.wait(BODY_TIMEOUT_S + 10)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b'"code":"body_timeout"' in answer.replace(b" ", b"") and b"\r\nConnection: close\r\n" in answer
        assert sender.answered_after is not None and sender.answered_after < BODY_TIMEOUT_S + 3


def test_a_slow_v1_body_does_not_hold_a_waiting_slot(
    served: dict[str, Any], slow_senders: Callable[..., SlowSender]
) -> None:
    slow = slow_senders(served["port"], "/v1/audio/transcriptions", served["key"])
    time.sleep(1)  # the slow request is in the view, reading its body
    assert slow.answered_after is None, "the slow request must still be sending when the fast one comes"
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{served['port']}/v1", api_key=served["key"], max_retries=0)
    with (FIXTURES / "fox.wav").open("rb") as audio:
        text = client.audio.transcriptions.create(file=audio, model="whisper-1", response_format="text")
    assert "dog" in str(text).lower(), "the fast request was served, not refused busy"
    assert slow.wait(BODY_TIMEOUT_S + 10).startswith(b"HTTP/1.1 408 ")


def test_wrong_keys_in_a_row_on_one_openai_client_all_raise_authentication_error(served: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{served['port']}/v1", api_key="wf_" + "x" * 43, max_retries=0)
    audio = ("speech.wav", wav_bytes(10))  # 320 kB: more than gunicorn drains to reuse the connection
    # The client keeps its connection between calls: without `Connection: close` the third call (measured)
    # went out on a connection gunicorn had closed, and failed with APIConnectionError.
    for create in [client.audio.transcriptions.create, client.audio.translations.create] * 2:
        with pytest.raises(openai.AuthenticationError):
            create(file=audio, model="whisper-1")


def test_an_answer_before_the_body_says_connection_close(served: dict[str, Any]) -> None:
    with socket.create_connection(("127.0.0.1", served["port"]), timeout=30) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer wf_wrong\r\n"
                     b"Content-Type: audio/wav\r\nContent-Length: 1000000\r\n\r\n" + b"\0" * 1000)  # fmt: skip
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    head = answer.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0].startswith(b"HTTP/1.1 401 ") and b"Connection: close" in head[1:]


def test_the_test_client_sees_connection_close_only_where_the_body_was_left_unread(
    make_app: Callable[..., Flask],
) -> None:
    app = make_app()
    refused = app.test_client(use_cookies=False)
    refused.environ_base["HTTP_AUTHORIZATION"] = "Bearer wf_wrong"
    response = upload(refused)
    assert (response.status_code, response.headers.get("Connection")) == (401, "close")
    accepted = upload(app.test_client())
    assert (accepted.status_code, accepted.headers.get("Connection")) == (202, None)


class Trickle(io.BytesIO):
    """A request body that gives one byte every 0.2 s."""

    def read(self, size: int | None = -1) -> bytes:
        time.sleep(0.2)
        return super().read(min(1, size) if size is not None and size >= 0 else 1)


def test_a_body_past_its_bound_is_answered_408_between_reads(make_app: Callable[..., Flask]) -> None:
    client = make_app(BODY_TIMEOUT_S=0.5).test_client()
    response = client.post("/upload", input_stream=Trickle(bytes(100)), content_type="audio/wav")
    assert (response.status_code, response.get_json()["code"]) == (408, "body_timeout")
    assert response.headers["Connection"] == "close"
