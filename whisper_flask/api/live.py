"""Live transcription over WebSocket: /ws/transcribe (this service's protocol) and the browser's /live/token.

The client sends binary frames of 16 kHz 16-bit little-endian mono PCM (or, with `input_audio_format=webm`, a
browser MediaRecorder's WebM/Opus stream), and `{"type": "end"}` (or a
close) when done; the server sends `{"type": "partial", "text", "start", "end"}` (the tentative text
after the final text so far: each partial replaces the last) and `{"type": "final", "text", "start",
"end"}` (text that follows the last final text and will not change), then `{"type": "end"}`
(ARCHITECTURE.md, "Live transcription").
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, g, jsonify, request

from whisper_flask.api import download_url, progress_body
from whisper_flask.api.auth import presented_key, principal
from whisper_flask.api.fields import FIELDS, parse_flag
from whisper_flask.api.websocket import SessionClosed, offered_token, serve
from whisper_flask.audio.stream_decode import LiveAudioFormat
from whisper_flask.engine.live import LiveEvent, LiveEventKind
from whisper_flask.engine.options import Task
from whisper_flask.exceptions import InvalidOption, ServiceError
from whisper_flask.extension import get_service
from whisper_flask.service.face import LIVE_TOKEN_TTL_S
from whisper_flask.service.live import LiveRequest, LiveSession, pcm_samples

bp = Blueprint("live", __name__)
#: The endpoints that take a live token instead of a key (a browser's WebSocket cannot send headers).
TOKEN_ENDPOINTS = {"live.transcribe_live", "realtime.realtime"}


def authenticate_live() -> None:
    """A key in the headers, or on a live socket a token offered as the subprotocol `token.<token>`."""
    token = offered_token()
    if token is not None and presented_key() is None and request.endpoint in TOKEN_ENDPOINTS:
        g.principal = get_service().authenticate_token(token, request.remote_addr or "")
    else:
        g.principal = get_service().authenticate(presented_key(), request.remote_addr or "")


bp.before_request(authenticate_live)


@bp.post("/live/token")
def live_token() -> Response:
    """A token that opens live sessions for LIVE_TOKEN_TTL_S seconds, for a browser to offer as a subprotocol."""
    return jsonify({"token": get_service().live_token(principal()), "expires_in": LIVE_TOKEN_TTL_S})


@bp.route("/ws/transcribe", websocket=True)
def transcribe_live() -> Response:
    """Live transcription: PCM frames in, partial and final text out; `save=true` keeps it as a job."""
    service = get_service()
    multilingual = service.is_multilingual
    language = request.args.get("language")
    task = request.args.get("task")
    live = LiveRequest(
        owner=principal().name,
        client=request.remote_addr,
        language=FIELDS["language"].parse(language, multilingual) if language else None,
        task=FIELDS["task"].parse(task, multilingual) if task else Task.TRANSCRIBE,
        save=parse_flag("save", request.args.get("save", "false")),
        audio=parse_audio_format(request.args.get("input_audio_format", LiveAudioFormat.PCM16.value)),
    )
    session = service.open_live(live)
    return serve(session, TranscribeProtocol, service.settings.LIVE_IDLE_S)


def parse_audio_format(value: str) -> LiveAudioFormat:
    """The `input_audio_format` query field; InvalidOption for a format not offered."""
    try:
        return LiveAudioFormat(value)
    except ValueError:
        formats = ", ".join(audio.value for audio in LiveAudioFormat)
        raise InvalidOption("input_audio_format", f"must be one of {formats}") from None


def event_message(event: LiveEvent) -> dict[str, Any] | None:
    """A partial or final event as /ws/transcribe sends it (None for the others)."""
    if event.kind not in (LiveEventKind.PARTIAL, LiveEventKind.FINAL):
        return None
    return {"type": event.kind.value, "text": event.text, "start": round(event.start, 2), "end": round(event.end, 2)}


class TranscribeProtocol:
    """/ws/transcribe's messages."""

    def __init__(self, session: LiveSession) -> None:
        self._session = session

    def opened(self) -> list[dict[str, Any]]:
        """Nothing: the client may stream at once."""
        return []

    def receive(self, frames: list[str | bytes]) -> list[dict[str, Any]]:
        """Audio heard (consecutive frames as one), or the client's `{"type": "end"}`."""
        messages: list[dict[str, Any]] = []
        audio = b""
        for frame in frames:
            if isinstance(frame, bytes):
                if self._session.request.audio is LiveAudioFormat.PCM16:
                    pcm_samples(frame)  # each frame is checked on its own, as sent
                audio += frame
                continue
            if audio:
                messages += self._messages(self._session.feed(audio))
                audio = b""
            if self._ends(frame):
                raise SessionClosed(messages)
        return messages + (self._messages(self._session.feed(audio)) if audio else [])

    def _ends(self, message: str) -> bool:
        """Whether a text frame is `{"type": "end"}`, the only command; InvalidOption for any other."""
        try:
            kind = json.loads(message).get("type")
        except (ValueError, AttributeError, RecursionError):
            raise InvalidOption("message", 'text frames must be JSON objects such as {"type": "end"}') from None
        if kind == "end":
            return True
        raise InvalidOption("type", f'unknown message type {str(kind)[:40]!r}; send audio as binary frames, then "end"')

    def ending(self, reason: str) -> list[dict[str, Any]]:
        """The text held, final; then `{"type": "end"}`, with the job a saved session became."""
        messages = self._messages(self._session.commit())
        end: dict[str, Any] = {"type": "end", "reason": reason}
        view = self._session.close()
        if view is not None:
            end["job"] = {**progress_body(view), "download_url": download_url(view.job.id, "txt")}
        return [*messages, end]

    def error(self, error: ServiceError) -> dict[str, Any]:
        """`{"type": "error", "code", "error"}`, as the JSON error contract says it."""
        return {"type": "error", "code": error.code, "error": str(error)}

    def _messages(self, events: list[LiveEvent]) -> list[dict[str, Any]]:
        return [message for event in events if (message := event_message(event)) is not None]
