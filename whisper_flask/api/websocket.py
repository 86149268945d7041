"""A live session's WebSocket: accepted only after the request is authenticated and a session is open, then a
loop of frames in and events out until the client ends, vanishes, idles or the service stops.

flask-sock's route decorator opens the WebSocket before its view runs, so a wrong key or a full house
could only be told after the handshake; here the view refuses with a JSON error and a status first, then
accepts with simple-websocket (flask-sock's own engine), ending the response as flask-sock does
(ARCHITECTURE.md, "Live transcription").
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from socket import SHUT_RDWR
from typing import Any, Protocol, SupportsIndex

from flask import Response, request
from simple_websocket import ConnectionClosed, Server

from whisper_flask.exceptions import InvalidAudio, InvalidOption, ServiceError, ShuttingDown
from whisper_flask.service.live import LiveSession

log = logging.getLogger(__name__)

#: The subprotocol a browser offers beside `token.<token>`, and the one the server picks.
SUBPROTOCOL = "whisper-flask"
TOKEN_PREFIX = "token."
#: The largest frame taken (8 s of 16 kHz 16-bit PCM; 4 s of OpenAI's 24 kHz as base64 in JSON).
MAX_FRAME_BYTES = 256 * 1024
#: Frames received and not yet heard, in bytes, past which the socket is not read: the client's sends then
#: wait (TCP's own flow control), so one flooding while a decode runs holds at most this much memory here.
MAX_QUEUED_BYTES = 1024 * 1024
#: The most frames heard together (a burst bounds the audio one decode may have to catch up on).
MAX_BURST = 100
#: How often the loop looks up from an idle socket (the service stopping, the idle limit).
RECEIVE_S = 0.25
#: How long the client has to answer the server's close frame.
CLOSE_HANDSHAKE_S = 1.0
#: Close codes (RFC 6455): normal, going away, unsupported data, policy violation, internal error.
NORMAL, GOING_AWAY, UNSUPPORTED, POLICY, INTERNAL = 1000, 1001, 1003, 1008, 1011


class SessionClosed(Exception):
    """The client asked to end the session; `messages` are those its frames before that made known."""

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        super().__init__("the client ended the session")
        self.messages = messages


class LiveProtocol(Protocol):
    """What is said on a live socket: /ws/transcribe's own protocol, or OpenAI's Realtime events."""

    def opened(self) -> list[dict[str, Any]]:
        """The messages sent once the socket is open."""

    def receive(self, frames: list[str | bytes]) -> list[dict[str, Any]]:
        """What the client's frames (all that had arrived) make known; SessionClosed once it ends the session."""

    def ending(self, reason: str) -> list[dict[str, Any]]:
        """The last messages before the socket closes (the text still held made final): `reason` is why."""

    def error(self, error: ServiceError) -> dict[str, Any]:
        """A service error as this protocol says it."""


def offered_token() -> str | None:
    """A live token offered as the subprotocol `token.<token>` (browsers cannot set a WebSocket's headers)."""
    offered = request.headers.get("Sec-WebSocket-Protocol", "")
    tokens = [name.strip()[len(TOKEN_PREFIX) :] for name in offered.split(",") if name.strip().startswith(TOKEN_PREFIX)]
    return tokens[0] if tokens else None


def serve(session: LiveSession, make_protocol: Callable[[LiveSession], LiveProtocol], idle_s: float) -> Response:
    """Accept the WebSocket and run the session to its end; the slot is free as soon as it ends."""
    try:
        socket = _BoundedServer.accept(request.environ, subprotocols=[SUBPROTOCOL], max_message_size=MAX_FRAME_BYTES)
    except BaseException:
        session.close()
        raise
    protocol = make_protocol(session)
    reason = "end"
    code = NORMAL
    try:
        _send(socket, protocol.opened())
        reason, code = _converse(socket, session, protocol, idle_s)
        _send(socket, protocol.ending(reason))
    except ConnectionClosed:  # the client vanished: its slot is freed below, at once
        reason = "gone"
    except SessionClosed as closed:
        _send_quietly(socket, closed.messages + protocol.ending("end"))
    except ServiceError as error:
        code = UNSUPPORTED if isinstance(error, InvalidAudio | InvalidOption) else INTERNAL
        code = GOING_AWAY if isinstance(error, ShuttingDown) else code
        _send_quietly(socket, [protocol.error(error)])
    except Exception:  # a bug must not leave the client waiting: it is logged, and the session ends with 1011
        log.exception("live session failed")
        code = INTERNAL
        _send_quietly(socket, [protocol.error(ServiceError("the live session failed on the server"))])
    finally:
        session.close()
        log.info("live session ended (%s) after %.1f s of audio", reason, session.seconds)
        _close(socket, code)
    return _ended_response(socket)


def _close(socket: Server, code: int) -> None:
    """Close the WebSocket, then the TCP connection itself.

    The server's own file objects on the socket (werkzeug's rfile and wfile) would keep it open after
    simple-websocket closes it, and the client would wait out its close timeout for the end of the stream.
    """
    try:
        socket.close(code)
    except ConnectionClosed:
        pass
    socket.thread.join(CLOSE_HANDSHAKE_S)  # the client's answering close frame
    try:
        socket.sock.shutdown(SHUT_RDWR)
    except OSError:  # already gone
        pass


def _converse(socket: Server, session: LiveSession, protocol: LiveProtocol, idle_s: float) -> tuple[str, int]:
    """Frames in, messages out, until the service stops or the client idles; SessionClosed when the client ends."""
    heard = time.monotonic()
    while not session.stopping:
        message = socket.receive(timeout=RECEIVE_S)
        if message is None:
            if time.monotonic() - heard > idle_s:
                return "idle", POLICY
            continue
        heard = time.monotonic()
        # Every frame that has arrived is heard at once: after a slow decode the session catches up in
        # one decode of all of them, not in one decode per frame.
        frames = [message]
        while len(frames) < MAX_BURST and (more := socket.receive(timeout=0)) is not None:
            frames.append(more)
        _send(socket, protocol.receive(frames))
    return "shutting_down", GOING_AWAY


def _send(socket: Server, messages: list[dict[str, Any]]) -> None:
    for message in messages:
        socket.send(json.dumps(message))


def _send_quietly(socket: Server, messages: list[dict[str, Any]]) -> None:
    """Send what can still be sent to a client that may have gone."""
    try:
        _send(socket, messages)
    except (ConnectionClosed, OSError, ServiceError):
        pass


class _Frames(list[str | bytes]):
    """simple-websocket's buffer of received frames, bounded: its reader thread waits in append() while the
    buffer holds MAX_QUEUED_BYTES, and so stops reading the socket until receive() takes frames out."""

    def __init__(self, socket: Server) -> None:
        super().__init__()
        self._socket = socket
        self._room = threading.Condition()
        self._bytes = 0

    def append(self, frame: str | bytes) -> None:
        """Queue a frame once there is room (or at once if the socket has closed)."""
        with self._room:
            # A close from the session's thread does not notify: the wait looks again every RECEIVE_S.
            while self._bytes >= MAX_QUEUED_BYTES and self._socket.connected:
                self._room.wait(RECEIVE_S)
            super().append(frame)
            self._bytes += len(frame)

    def pop(self, index: SupportsIndex = -1) -> str | bytes:
        """Take a frame out, making room."""
        with self._room:
            frame = super().pop(index)
            self._bytes -= len(frame)
            self._room.notify_all()
            return frame


class _BoundedServer(Server):
    """simple-websocket's server with a bounded buffer of received frames (_Frames)."""

    def handshake(self) -> None:
        """The handshake, then the bounded buffer, before the reader thread starts (Base.__init__'s order)."""
        super().handshake()
        self.input_buffer = _Frames(self)


class _EndedResponse(Response):
    """The response of a request whose connection became a WebSocket: nothing more is written to it."""

    mode = "werkzeug"

    def __call__(self, environ: Any, start_response: Any) -> Any:
        if self.mode == "gunicorn":
            raise StopIteration()  # gunicorn's workers take this to mean the socket was handled
        return super().__call__(environ, start_response)


def _ended_response(socket: Server) -> Response:
    response = _EndedResponse()
    response.mode = socket.mode
    return response
