"""OpenAI's Realtime transcription protocol on /v1/realtime?intent=transcription, over the same live sessions.

Client events: `session.update` (a transcription session: `audio.input.format` audio/pcm at 24 kHz,
`audio.input.transcription.language`, `audio.input.turn_detection` server_vad or null; or the Realtime beta's
`transcription_session.update`: `input_audio_format` pcm16, `input_audio_transcription.language`,
`turn_detection`), `input_audio_buffer.append` (base64 PCM16), `.commit`, `.clear`. Server events:
`session.created`, `session.updated` (or `transcription_session.updated`), `input_audio_buffer.speech_started`/
`speech_stopped`/`committed`/`cleared`, `conversation.item.input_audio_transcription.delta` (final text, as it is
confirmed: a delta may come while its item is still being spoken) and `.completed`, and `error` (the session goes
on, as OpenAI's does)
(ARCHITECTURE.md, "Live transcription").
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import itertools
import json
import uuid
from typing import Any

from flask import Blueprint, Response, request

from whisper_flask.api.auth import principal
from whisper_flask.api.errors import openai_error
from whisper_flask.api.fields import FIELDS
from whisper_flask.api.live import authenticate_live
from whisper_flask.api.websocket import serve
from whisper_flask.engine.live import LiveEvent, LiveEventKind
from whisper_flask.exceptions import InvalidAudio, InvalidOption, ServiceError
from whisper_flask.extension import get_service
from whisper_flask.service.live import LiveRequest, LiveSession, pcm_samples

bp = Blueprint("realtime", __name__)
bp.before_request(authenticate_live)

#: OpenAI's Realtime audio is 24 kHz PCM16; 16 kHz (Whisper's own) is taken too.
RATES = (24000, 16000)
#: server_vad as this service runs it (engine/live.py: Silero's thresholds, a 0.6 s pause, 0.4 s kept before).
SERVER_VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 400, "silence_duration_ms": 600}


@bp.route("/v1/realtime", websocket=True)
def realtime() -> Response:
    """OpenAI's Realtime API, transcription sessions only (`intent=transcription`)."""
    if request.args.get("intent") != "transcription":
        raise InvalidOption("intent", "only transcription sessions are served: connect with ?intent=transcription")
    service = get_service()
    session = service.open_live(LiveRequest(owner=principal().name, client=request.remote_addr))
    return serve(session, RealtimeProtocol, service.settings.LIVE_IDLE_S)


class RealtimeProtocol:
    """One Realtime transcription session's events: items are utterances (server VAD) or what lies between commits."""

    def __init__(self, session: LiveSession) -> None:
        self._session = session
        self._rate = RATES[0]
        self._server_vad = True
        self._events = itertools.count(1)
        self._item: str | None = None  # the item being heard
        self._previous: str | None = None  # the last committed item
        self._text = ""  # the item's final text so far
        self._start = 0.0  # where the item's audio starts (s)

    def opened(self) -> list[dict[str, Any]]:
        """`session.created`, with the session's settings."""
        return [self._event("session.created", session=self._settings())]

    def receive(self, frames: list[str | bytes]) -> list[dict[str, Any]]:
        """The client events' answers, consecutive appends heard as one; a bad event answers `error` and goes on."""
        messages: list[dict[str, Any]] = []
        audio = b""
        for frame in frames:
            event = self._parse(frame)
            if isinstance(event, dict) and event.get("type") == "input_audio_buffer.append":
                audio += self._audio(event)
                continue
            if audio:
                messages += self._append(audio)
                audio = b""
            messages += self._answer(event) if isinstance(event, dict) else [event[0]]
        return messages + (self._append(audio) if audio else [])

    def _parse(self, message: str | bytes) -> dict[str, Any] | list[dict[str, Any]]:
        """The event, or [an error event] for a frame that is not one."""
        if isinstance(message, bytes):
            raise InvalidOption("message", "Realtime events are JSON text frames")
        try:
            event = json.loads(message)
        except (ValueError, RecursionError):
            return [self._error(InvalidOption("event", "not a JSON object"), None)]
        if not isinstance(event, dict):
            return [self._error(InvalidOption("event", "not a JSON object"), None)]
        return event

    def _answer(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """A client event other than append: its answers, or an error event."""
        handlers = {
            "session.update": self._update,
            "transcription_session.update": self._update_beta,
            "input_audio_buffer.commit": self._commit,
            "input_audio_buffer.clear": self._clear,
        }
        handler = handlers.get(str(event.get("type")))
        try:
            if handler is None:
                raise InvalidOption("type", f"unknown or unsupported event type {str(event.get('type'))[:60]!r}")
            return handler(event)
        except InvalidOption as error:
            return [self._error(error, event.get("event_id"))]

    def ending(self, reason: str) -> list[dict[str, Any]]:
        """The item being heard, committed and completed."""
        return self._completed(self._session.commit()) if self._item else []

    def error(self, error: ServiceError) -> dict[str, Any]:
        """An `error` event in OpenAI's envelope."""
        return self._error(error, None)

    def _update(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        settings = event.get("session")
        if not isinstance(settings, dict) or settings.get("type", "transcription") != "transcription":
            raise InvalidOption("session.type", 'only "transcription" sessions are served')
        audio = _object(_object(settings.get("audio"), "session.audio").get("input"), "session.audio.input")
        fmt = _object(audio.get("format", {"type": "audio/pcm", "rate": self._rate}), "session.audio.input.format")
        if fmt.get("type") != "audio/pcm" or fmt.get("rate", RATES[0]) not in RATES:
            raise InvalidOption("session.audio.input.format", "audio/pcm at 24000 (or 16000) Hz only")
        language = _object(audio.get("transcription"), "session.audio.input.transcription").get("language")
        if language is not None and not isinstance(language, str):
            raise InvalidOption("session.audio.input.transcription.language", "a language code or name")
        parsed = FIELDS["language"].parse(language, get_service().is_multilingual) if language else None
        turn_detection = audio.get("turn_detection", SERVER_VAD)
        if turn_detection is not None and _object(turn_detection, "turn_detection").get("type") != "server_vad":
            raise InvalidOption("session.audio.input.turn_detection", "server_vad or null")
        self._session.reconfigure(
            dataclasses.replace(self._session.request, language=parsed, commit_on_pause=turn_detection is not None)
        )
        self._rate, self._server_vad = fmt.get("rate", RATES[0]), turn_detection is not None
        return [self._event("session.updated", session=self._settings())]

    def _update_beta(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """The Realtime beta's transcription_session.update, read as the session.update it stands for."""
        beta = _object(event.get("session"), "session")
        if beta.get("input_audio_format", "pcm16") != "pcm16":
            raise InvalidOption("session.input_audio_format", "pcm16 (24000 Hz) only")
        audio_input = {
            "format": {"type": "audio/pcm", "rate": RATES[0]},
            "transcription": _object(beta.get("input_audio_transcription"), "input_audio_transcription"),
        }
        if "turn_detection" in beta:  # absent keeps server VAD; null turns it off
            audio_input["turn_detection"] = beta["turn_detection"]
        self._update({"session": {"type": "transcription", "audio": {"input": audio_input}}})
        applied = self._settings()["audio"]["input"]
        session = {"input_audio_format": "pcm16", "input_audio_transcription": applied["transcription"],
                   "turn_detection": applied["turn_detection"], "modalities": ["text"]}  # fmt: skip
        return [self._event("transcription_session.updated", session=session)]

    def _audio(self, event: dict[str, Any]) -> bytes:
        """An append's PCM16, checked as its own frame; InvalidAudio (the session ends) if it is not that."""
        try:
            data = base64.b64decode(str(event.get("audio", "")), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidAudio("input_audio_buffer.append: audio must be base64 PCM16") from None
        pcm_samples(data, self._rate)
        return data

    def _append(self, data: bytes) -> list[dict[str, Any]]:
        if not self._server_vad and self._item is None:
            self._open_item()
        return self._messages(self._session.feed(data, self._rate))

    def _commit(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        if self._item is None:
            raise InvalidOption("input_audio_buffer", "the buffer holds no audio to commit")
        return self._completed(self._session.commit())

    def _clear(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        self._session.clear()
        self._item, self._text = None, ""
        return [self._event("input_audio_buffer.cleared")]

    def _messages(self, events: list[LiveEvent]) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        for index, event in enumerate(events):
            if event.kind is LiveEventKind.SPEECH_STARTED and self._server_vad:
                self._open_item(event.start)
                messages.append(
                    self._event(
                        "input_audio_buffer.speech_started", audio_start_ms=_ms(event.start), item_id=self._item
                    )
                )
            elif event.kind is LiveEventKind.FINAL and self._item is not None:
                self._text += event.text
                messages.append(self._event("conversation.item.input_audio_transcription.delta",
                                            item_id=self._item, content_index=0, delta=event.text))  # fmt: skip
            elif event.kind is LiveEventKind.SPEECH_STOPPED and self._server_vad and self._item is not None:
                return messages + self._completed(events[index + 1 :], stopped=event.end)
        return messages

    def _completed(self, events: list[LiveEvent], stopped: float | None = None) -> list[dict[str, Any]]:
        """The item's last deltas, then speech_stopped (server VAD), committed and completed."""
        messages = self._messages([event for event in events if event.kind is LiveEventKind.FINAL])
        item, end = self._item, self._session.seconds if stopped is None else stopped
        if self._server_vad:
            messages.append(self._event("input_audio_buffer.speech_stopped", audio_end_ms=_ms(end), item_id=item))
        messages.append(self._event("input_audio_buffer.committed", previous_item_id=self._previous, item_id=item))
        usage = {"type": "duration", "seconds": round(end - self._start, 3)}
        messages.append(self._event("conversation.item.input_audio_transcription.completed", item_id=item,
                                    content_index=0, transcript=self._text.strip(), usage=usage))  # fmt: skip
        self._previous, self._item, self._text = item, None, ""
        return messages

    def _open_item(self, start: float | None = None) -> None:
        self._item = f"item_{uuid.uuid4().hex[:20]}"
        self._start = self._session.seconds if start is None else start

    def _settings(self) -> dict[str, Any]:
        request = self._session.request
        return {
            "type": "transcription",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": self._rate},
                    "transcription": {"model": get_service().model_name, "language": request.language},
                    "turn_detection": SERVER_VAD if self._server_vad else None,
                }
            },
        }

    def _error(self, error: ServiceError, client_event: Any) -> dict[str, Any]:
        body = openai_error(error)["error"]
        return self._event("error", error={**body, "event_id": client_event if isinstance(client_event, str) else None})

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "event_id": f"event_{next(self._events)}", **fields}


def _object(value: Any, name: str) -> dict[str, Any]:
    """A client's JSON object (an absent one is empty); InvalidOption naming it if it is something else."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidOption(name, "must be a JSON object")
    return value


def _ms(seconds: float) -> int:
    return round(seconds * 1000)
