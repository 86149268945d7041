"""OpenAI's Realtime transcription protocol on /v1/realtime, on the fake engine, checked against OpenAI's own types."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from openai import OpenAI
from openai.types.beta.realtime import TranscriptionSessionUpdatedEvent
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter
from websockets.sync.client import ClientConnection

from tests.helpers import Served, received, refusal, silence, tone

PATH = "/v1/realtime?intent=transcription"
#: OpenAI's own declaration of every server event: each event sent must validate against it.
SERVER_EVENT: TypeAdapter[Any] = TypeAdapter(RealtimeServerEvent)
BETA_UPDATED: TypeAdapter[Any] = TypeAdapter(TranscriptionSessionUpdatedEvent)


def at_24k(pcm: bytes) -> bytes:
    """16 kHz PCM16 as OpenAI's 24 kHz PCM16 (linear interpolation: enough for the fake engine's loudness)."""
    samples = np.frombuffer(pcm, "<i2").astype(np.float32)
    positions = np.arange(len(samples) * 3 // 2) * 2 / 3
    return np.interp(positions, np.arange(len(samples)), samples).astype("<i2").tobytes()


def append(ws: ClientConnection, pcm: bytes, frame_s: float = 0.1) -> None:
    """Send 24 kHz PCM16 as input_audio_buffer.append events of `frame_s` each."""
    step = int(24000 * frame_s) * 2
    for index in range(0, len(pcm), step):
        ws.send(
            json.dumps(
                {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[index : index + step]).decode()}
            )
        )


def events(ws: ClientConnection, until: str) -> list[dict[str, Any]]:
    """Server events up to and including the first of type `until`, each validated as OpenAI declares it."""
    seen: list[dict[str, Any]] = []
    while not seen or seen[-1]["type"] != until:
        seen.append(json.loads(ws.recv(timeout=30)))
        SERVER_EVENT.validate_python(seen[-1])
    return seen


def committed_tone(ws: ClientConnection) -> list[dict[str, Any]]:
    """Append 2 s of tone and 1 s of silence, commit, and return the events up to the item's completed one."""
    append(ws, at_24k(tone(2.0) + silence(1.0)))
    ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
    return events(ws, "conversation.item.input_audio_transcription.completed")


def test_server_vad_turns_an_utterance_into_one_item_with_deltas_and_a_completed_transcript(
    serve: Callable[..., Served],
) -> None:
    """speech_started, deltas, speech_stopped, committed, completed: all for one item, in that order."""
    with serve().connect(PATH) as ws:
        assert events(ws, "session.created")[0]["session"]["type"] == "transcription"
        append(ws, at_24k(tone(2.0) + silence(1.0)))
        seen = events(ws, "conversation.item.input_audio_transcription.completed")
    kinds = [event["type"] for event in seen]
    assert kinds[0] == "input_audio_buffer.speech_started"
    assert kinds[-3:] == [
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.input_audio_transcription.completed",
    ]
    assert len({event["item_id"] for event in seen}) == 1
    deltas = "".join(event["delta"] for event in seen if event["type"].endswith(".delta"))
    assert seen[-1]["transcript"] == deltas.strip() == "w0 w0.5 w1 w1.5"
    assert seen[0]["audio_start_ms"] < seen[-3]["audio_end_ms"] <= 3000


def test_without_turn_detection_the_client_commits_and_an_empty_commit_is_an_error(
    serve: Callable[..., Served],
) -> None:
    """With turn_detection null nothing ends an item but a commit; committing nothing is an error event, not the end."""
    with serve().connect(PATH) as ws:
        events(ws, "session.created")
        update = {
            "type": "session.update",
            "session": {"type": "transcription", "audio": {"input": {"turn_detection": None}}},
        }
        ws.send(json.dumps(update))
        assert events(ws, "session.updated")[-1]["session"]["audio"]["input"]["turn_detection"] is None
        ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": "mine"}))
        error = events(ws, "error")[-1]["error"]
        assert (error["code"], error["event_id"]) == ("invalid_option", "mine")
        seen = committed_tone(ws)
    assert "input_audio_buffer.speech_started" not in [event["type"] for event in seen]
    assert seen[-1]["transcript"].startswith("w0 w0.5 w1 w1.5")


def test_the_realtime_betas_transcription_session_update_configures_the_session(
    serve: Callable[..., Served],
) -> None:
    """transcription_session.update (the beta's shape) is answered in the beta's shape and takes effect."""
    with serve().connect(PATH) as ws:
        events(ws, "session.created")
        update = {
            "type": "transcription_session.update",
            "session": {
                "input_audio_format": "pcm16",
                "input_audio_transcription": {"model": "whisper-1", "language": "en"},
                "turn_detection": None,
            },
        }
        ws.send(json.dumps(update))
        updated = json.loads(ws.recv(timeout=30))
        # The beta's type is also the REST reply's: it demands the client_secret that OpenAI's reference says a
        # WebSocket update does not carry, and only OpenAI's model names. The rest must be as it declares.
        session = updated["session"]
        BETA_UPDATED.validate_python({**updated, "session": {
            **session, "client_secret": {"value": "", "expires_at": 0},
            "input_audio_transcription": {**session["input_audio_transcription"], "model": "whisper-1"},
        }})  # fmt: skip
        assert updated["type"] == "transcription_session.updated"
        assert updated["session"]["input_audio_transcription"]["language"] == "en"
        assert updated["session"]["turn_detection"] is None
        seen = committed_tone(ws)
    assert "input_audio_buffer.speech_started" not in [event["type"] for event in seen]  # turn detection is off
    assert seen[-1]["transcript"].startswith("w0 w0.5 w1 w1.5")


def test_openais_client_runs_a_transcription_session(serve: Callable[..., Served]) -> None:
    """OpenAI's Python client connects with intent=transcription, updates the session and gets its transcript."""
    served = serve()
    client = OpenAI(api_key=served.key, base_url=f"http://127.0.0.1:{served.port}/v1",
                    websocket_base_url=f"ws://127.0.0.1:{served.port}/v1")  # fmt: skip
    with client.realtime.connect(extra_query={"intent": "transcription"}, max_retries=0) as connection:
        assert connection.recv().type == "session.created"
        connection.session.update(session={"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 24000}, "transcription": {"model": "whisper-1", "language": "en"},
        }}})  # fmt: skip
        assert connection.recv().type == "session.updated"
        pcm = at_24k(tone(2.0) + silence(1.0))
        for index in range(0, len(pcm), 4800):
            connection.input_audio_buffer.append(audio=base64.b64encode(pcm[index : index + 4800]).decode())
        while (event := connection.recv()).type != "conversation.item.input_audio_transcription.completed":
            pass
    assert event.transcript == "w0 w0.5 w1 w1.5"


@pytest.mark.parametrize(
    "event",
    [
        {"type": "response.create"},
        {"type": "session.update", "session": {"type": "realtime"}},
        {"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}},
        {"type": "session.update", "session": {"audio": {"input": {"transcription": {"language": "klingon"}}}}},
        {"type": "session.update", "session": {"audio": "loud"}},
        {"type": "session.update", "session": {"audio": {"input": {"format": [], "turn_detection": 7}}}},
        {"type": "session.update", "session": {"audio": {"input": {"transcription": {"language": ["en"]}}}}},
        {"type": "transcription_session.update", "session": {"input_audio_format": "g711_ulaw"}},
        {"type": "transcription_session.update", "session": {"input_audio_transcription": "en"}},
    ],
)
def test_an_event_it_does_not_serve_answers_an_error_and_the_session_goes_on(
    serve: Callable[..., Served], event: dict[str, Any]
) -> None:
    """An unknown event or setting is an `error` event naming it; the session still transcribes."""
    with serve().connect(PATH) as ws:
        events(ws, "session.created")
        ws.send(json.dumps(event))
        assert events(ws, "error")[-1]["error"]["type"] == "invalid_request_error"
        append(ws, at_24k(tone(2.0) + silence(1.0)))
        assert events(ws, "conversation.item.input_audio_transcription.completed")[-1]["transcript"]


def test_audio_that_is_not_pcm16_ends_the_session_with_an_error(serve: Callable[..., Served]) -> None:
    """Base64 that is not PCM16 (random bytes) gets an error event in OpenAI's envelope and the socket closes."""
    with serve().connect(PATH) as ws:
        events(ws, "session.created")
        noise = np.random.default_rng(0).integers(-32768, 32767, 4800, dtype="<i2").tobytes()
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(noise).decode()}))
        messages, code = received(ws, timeout=10)
    assert messages[-1]["type"] == "error" and messages[-1]["error"]["code"] == "invalid_audio"
    assert code == 1003


def test_only_transcription_sessions_are_served(serve: Callable[..., Served]) -> None:
    """Without intent=transcription the handshake is refused in OpenAI's error envelope."""
    status, body = refusal(serve(), "/v1/realtime")
    assert status == 400 and body["error"]["param"] == "intent"
