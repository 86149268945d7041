"""The request body on the wire: it must keep arriving, and a response sent before its end closes the connection.

`BodyGuard` wraps the app (WSGI), so both rules hold for every route, error and server:

- **A bounded time.** A body gets BODY_TIMEOUT_S, plus a second for every `MIN_BODY_RATE` bytes
  received; past that a read raises ApiError 408 `body_timeout`. A read can block inside the
  server: gunicorn reads until it holds what was asked, so a client sending a byte a second never
  lets one return. At the deadline the socket's read side is therefore shut (when the server
  exposes its socket), which ends that read at once; the answer still goes out on the write side.
- **No reuse of a connection whose body was left unread.** A response that starts before the body's
  end (a 401 before the upload, a 413, any error) says `Connection: close`. The server could not
  skip what is left: gunicorn drains 64 KiB, then closes a connection it had announced as
  keep-alive, and a client that sends its next request there gets no answer. gunicorn drops an
  application's `Connection` header (PEP 3333 makes it hop-by-hop); deploy/gunicorn.conf.py makes
  gunicorn honour it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from whisper_flask.api.errors import ApiError

#: The slowest a body may arrive once its first BODY_TIMEOUT_S have passed (16 KiB/s: 128 kbit/s).
MIN_BODY_RATE = 16 * 1024

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class BodyGuard:
    """WSGI middleware: bounds the time a request body may take, and closes connections left with an unread body."""

    def __init__(self, app: WsgiApp, timeout_s: float) -> None:
        self._app = app
        self._timeout_s = timeout_s

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """Serve one request with its body guarded."""
        length = _content_length(environ)
        if length == 0 or (length is None and "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower()):
            return self._app(environ, start_response)  # no body: nothing to guard
        server_socket = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
        body = GuardedBody(environ["wsgi.input"], length, self._timeout_s, server_socket)
        environ["wsgi.input"] = body

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            body.stop_clock()  # the app has answered: a late deadline must not cut the connection's next request
            if not body.finished:
                headers = [(name, value) for name, value in headers if name.lower() != "connection"]
                headers.append(("Connection", "close"))
            return start_response(status, headers, exc_info)

        try:
            return self._app(environ, start)
        finally:
            body.stop_clock()


class GuardedBody:
    """A request's wsgi.input that knows whether it was read to its end, and refuses reads past its deadline."""

    def __init__(self, stream: IO[bytes], length: int | None, timeout_s: float, server_socket: Any) -> None:
        self._stream = stream
        self._length = length
        self._started = time.monotonic()
        self._timeout_s = timeout_s
        self._received = 0
        self.finished = False
        self._expired = False
        self._socket = server_socket if isinstance(server_socket, socket.socket) else None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._arm()

    def _deadline(self) -> float:
        return self._started + self._timeout_s + self._received / MIN_BODY_RATE

    def _arm(self) -> None:
        # Caller holds the lock, or no other thread knows this body yet.
        if self._socket is None:
            return  # no socket to shut: the deadline is checked between reads only
        self._timer = threading.Timer(max(0.0, self._deadline() - time.monotonic()), self._on_deadline)
        self._timer.daemon = True
        self._timer.start()

    def _on_deadline(self) -> None:
        with self._lock:
            if self._timer is None:
                return  # stopped meanwhile
            if time.monotonic() < self._deadline():  # bytes came meanwhile: a later deadline
                self._arm()
                return
            self._expired = True
            self._timer = None
            try:
                assert self._socket is not None
                # socket.socket's own shutdown, not ssl.SSLSocket's, which would drop TLS for the answer.
                socket.socket.shutdown(self._socket, socket.SHUT_RD)  # ends a read blocked in the server
            except OSError:
                pass

    def stop_clock(self) -> None:
        """The body has been read, or the app answered: no deadline any more."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _checked(self, data: bytes, asked: int | None) -> bytes:
        with self._lock:
            self._received += len(data)
            if self._expired or time.monotonic() > self._deadline():
                self._expired = True
                raise ApiError(
                    408,
                    "body_timeout",
                    f"the request body did not arrive in time ({self._timeout_s:g} s, then at least"
                    f" {MIN_BODY_RATE // 1024} KiB/s); send it faster or in a smaller request",
                )
        if (not data and asked != 0) or (self._length is not None and self._received >= self._length):
            self.finished = True
            self.stop_clock()
        return data

    def read(self, size: int | None = -1) -> bytes:
        """Read up to `size` bytes of the body (all of it if negative)."""
        if self._expired:
            return self._checked(b"", size)
        return self._checked(
            self._guarded(lambda: self._stream.read(size) if size is not None else self._stream.read()), size
        )

    def readline(self, size: int | None = -1) -> bytes:
        """Read one line of the body."""
        if self._expired:
            return self._checked(b"", size)
        return self._checked(
            self._guarded(lambda: self._stream.readline(size) if size is not None else self._stream.readline()), size
        )

    def _guarded(self, read: Callable[[], bytes]) -> bytes:
        try:
            return read()
        except OSError:  # the deadline shut the socket under a read (gunicorn's chunked reader raises)
            if self._expired:
                return b""  # _checked answers 408
            raise

    def readlines(self, hint: int = -1) -> list[bytes]:
        """Read the body's remaining lines."""
        return list(iter(self.readline, b""))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")


def _content_length(environ: dict[str, Any]) -> int | None:
    try:
        return max(0, int(environ.get("CONTENT_LENGTH") or ""))
    except ValueError:
        return None
