"""Live transcription over WebSocket on the fake engine: the protocol, its bounds, its keys and tokens, bad frames."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import threading
import time
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flask import Flask
from websockets.exceptions import ConnectionClosed

from tests.helpers import (
    FakeEngine,
    Served,
    admits,
    eventually,
    final_text,
    keyed,
    pcm_of,
    received,
    refusal,
    send_paced,
    send_stream_paced,
    silence,
    tone,
    transcripts,
    webm_of,
)
from tests.servers import FIXTURES
from whisper_flask.api.websocket import MAX_FRAME_BYTES
from whisper_flask.audio.stream_decode import EBML_MAGIC as WEBM_MAGIC
from whisper_flask.exceptions import InvalidAudio
from whisper_flask.extension import get_service
from whisper_flask.service.live import pcm_samples

#: Loud enough for the fake detector for 2 s, then a pause that ends the utterance.
UTTERANCE = tone(2.0) + silence(1.0)


def test_a_session_sends_partial_then_final_text_and_ends_when_asked(serve: Callable[..., Served]) -> None:
    """Audio yields partial text, then final text that never changes, then an end once the client asks."""
    with serve().connect() as ws:
        send_paced(ws, UTTERANCE)
        ws.send(json.dumps({"type": "end"}))
        messages, code = received(ws)
    kinds = [message["type"] for message in messages]
    assert kinds.index("partial") < kinds.index("final")
    assert final_text(messages) == " w0 w0.5 w1 w1.5"
    assert messages[-1] == {"type": "end", "reason": "end"}
    assert code == 1000


def test_a_saved_session_becomes_a_job_whose_transcript_downloads(serve: Callable[..., Served]) -> None:
    """save=true queues the session's audio as a job, named in the end message, downloadable in every format."""
    served = serve()
    with served.connect("/ws/transcribe?save=true") as ws:
        send_paced(ws, UTTERANCE)
        ws.send(json.dumps({"type": "end"}))
        messages, _ = received(ws)
    job = messages[-1]["job"]
    assert job["filename"] == "live-session.wav" and job["duration"] == pytest.approx(3.0)
    client = keyed(served.app, "reader", admin=True)
    eventually(lambda: client.get(f"/progress/{job['transcription_id']}").json["status"] == "completed", 30)
    downloads = transcripts(client, job["transcription_id"])
    assert set(downloads) >= {"txt", "srt", "vtt", "json", "tsv"} and all(downloads.values())


@pytest.mark.parametrize(
    ("key", "status", "code"),
    [(None, 401, "missing_api_key"), ("not-a-key", 401, "invalid_api_key")],
)
def test_a_session_without_a_valid_key_is_refused_before_the_handshake(
    serve: Callable[..., Served], key: str | None, status: int, code: str
) -> None:
    """No key or a wrong one gets the JSON error contract and its status instead of a WebSocket."""
    got, body = refusal(serve(), key=key)
    assert (got, body["code"]) == (status, code) and body["error"]


def test_sessions_past_the_bound_are_refused_and_a_vanished_client_frees_its_slot(
    serve: Callable[..., Served],
) -> None:
    """With MAX_LIVE_SESSIONS=1 a second session gets 503 busy; once the first client vanishes, it is let in."""
    served = serve(MAX_LIVE_SESSIONS=1)
    first = served.connect()
    first.send(tone(0.2))
    status, body = refusal(served)
    assert (status, body["code"]) == (503, "busy")
    first.socket.close()  # gone without a close frame, as a client whose network dropped
    eventually(lambda: admits(served), 10, "the vanished client's slot was never freed")


def test_a_saved_session_already_queued_when_the_process_died_is_not_queued_again(
    serve: Callable[..., Served], make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    """A recording left beside the job it became (killed between the two) is removed at the next start, not queued."""
    served = serve()
    with served.connect("/ws/transcribe?save=true") as ws:
        send_paced(ws, UTTERANCE)
        ws.send(json.dumps({"type": "end"}))
        messages, _ = received(ws)
    job_id = messages[-1]["job"]["transcription_id"]
    get_service(served.app).stop()
    left = tmp_path / "uploads" / f".live-{job_id}"
    with wave.open(str(left.with_suffix(".wav")), "wb") as recording:
        recording.setnchannels(1), recording.setsampwidth(2), recording.setframerate(16000)
        recording.writeframes(UTTERANCE)
    left.with_suffix(".json").write_text(json.dumps({"owner": "speaker", "client": None, "language": None,
                                                     "task": "transcribe"}))  # fmt: skip
    client = keyed(make_app(), "reader", admin=True)  # started on the same files: recover() runs
    assert [job["transcription_id"] for job in client.get("/jobs").get_json()["jobs"]] == [job_id]
    assert not list((tmp_path / "uploads").glob(".live-*"))


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        (os.urandom(3200), "like random bytes"),
        (b"\x01\x02\x03", "even number of bytes"),
        (b"\x1a\x45\xdf\xa3" + bytes(200), "WebM"),
        ("not json", "JSON objects"),
        (json.dumps({"type": "play"}), "unknown message type"),
    ],
)
def test_a_bad_frame_ends_its_session_with_a_clear_error_and_spares_the_others(
    serve: Callable[..., Served], frame: bytes | str, says: str
) -> None:
    """Garbage gets an error message and close code 1003; a session beside it still gets its text."""
    served = serve()
    with served.connect() as bystander, served.connect() as ws:
        speaking = threading.Thread(target=send_paced, args=(bystander, UTTERANCE))
        speaking.start()
        ws.send(frame)
        messages, code = received(ws, timeout=10)
        speaking.join()
        bystander.send(json.dumps({"type": "end"}))
        spared, _ = received(bystander)
    assert messages[-1]["type"] == "error" and says in messages[-1]["error"]
    assert code == 1003
    assert final_text(spared) == " w0 w0.5 w1 w1.5"


def test_a_browsers_webm_opus_stream_is_decoded_as_it_arrives(serve: Callable[..., Served]) -> None:
    """input_audio_format=webm: a MediaRecorder's stream, sent in pieces as it is recorded, gives the PCM's text."""
    with serve().connect("/ws/transcribe?input_audio_format=webm") as ws:
        send_stream_paced(ws, webm_of(UTTERANCE), len(UTTERANCE) / 32000)
        ws.send(json.dumps({"type": "end"}))
        messages, code = received(ws)
    assert "partial" in [message["type"] for message in messages]
    assert final_text(messages) == " w0 w0.5 w1 w1.5"
    assert code == 1000


@pytest.mark.parametrize(
    "stream",
    [os.urandom(88_000), WEBM_MAGIC + os.urandom(88_000), WEBM_MAGIC + random.Random(67).randbytes(88_000)],
    ids=["random", "webm-header-then-random", "webm-header-then-bytes-ffmpeg-reads-on"],
)
def test_garbage_named_webm_ends_the_session_with_a_clear_error(serve: Callable[..., Served], stream: bytes) -> None:
    """Bytes sent as WebM that are not (even after its header, or such that ffmpeg reads on) get an error and 1003."""
    with serve().connect("/ws/transcribe?input_audio_format=webm") as ws:
        with contextlib.suppress(ConnectionClosed):
            for at in range(0, len(stream), 1600):  # refused within a few frames, or once 64 KiB decoded to nothing
                ws.send(stream[at : at + 1600])
                time.sleep(0.05)
        messages, code = received(ws, timeout=10)
    assert messages[-1]["type"] == "error" and "not WebM/Opus audio" in messages[-1]["error"], messages
    assert code == 1003


def test_a_format_not_offered_is_refused_at_the_handshake(serve: Callable[..., Served]) -> None:
    """input_audio_format=mp3 is answered 400 with the formats there are."""
    status, body = refusal(serve(), "/ws/transcribe?input_audio_format=mp3")
    assert status == 400 and "must be one of pcm16, webm" in body["error"], body


def test_a_client_flooding_the_socket_while_a_decode_runs_is_held_back(
    serve: Callable[..., Served], engine: FakeEngine
) -> None:
    """While a decode runs the server stops reading a flooding client's frames; then it ends that session (audio far
    ahead of real time) and frees its slot."""
    # Noisy, so that permessage-deflate (which simple-websocket accepts) cannot shrink what goes over the wire.
    noise = np.random.default_rng(0).integers(-2000, 2000, MAX_FRAME_BYTES // 2, dtype="<i2")
    frame = (np.frombuffer(tone(MAX_FRAME_BYTES / 32000), "<i2") + noise).astype("<i2").tobytes()
    engine.live_gate.clear()
    served, sent = serve(MAX_LIVE_SESSIONS=1), 0
    with served.connect() as ws:
        ws.send(tone(0.6))  # speech: a decode starts and waits at the gate

        def flood() -> None:
            nonlocal sent
            with contextlib.suppress(ConnectionClosed, OSError):
                for _ in range(400):  # 100 MiB
                    ws.send(frame)
                    sent += len(frame)

        assert engine.in_live_decode.wait(10)
        flooding = threading.Thread(target=flood)
        flooding.start()
        time.sleep(3)
        held_at = sent
        engine.live_gate.set()
        eventually(lambda: admits(served), 30, "the flooding session was never ended")
        # The flooding client may sit in a send, holding its connection's lock: end its sends from outside.
        ws.socket.shutdown(socket.SHUT_RDWR)
        flooding.join(30)
    # What was sent lies in the queue (MAX_QUEUED_BYTES) and the kernel's socket buffers: 5.5 MB here, against
    # 35 to 42 MB in the same 3 s with simple-websocket's own unbounded queue.
    assert held_at < 16 * 2**20


def test_an_idle_session_is_closed(serve: Callable[..., Served]) -> None:
    """A session that sends nothing for LIVE_IDLE_S is ended with reason idle and close code 1008."""
    with serve(LIVE_IDLE_S=0.5).connect() as ws:
        messages, code = received(ws, timeout=10)
    assert messages == [{"type": "end", "reason": "idle"}]
    assert code == 1008


def test_a_stopping_service_ends_its_sessions_with_their_text(serve: Callable[..., Served]) -> None:
    """On drain (gunicorn's SIGTERM) a session's held text is made final, then it ends with close code 1001."""
    served = serve()
    with served.connect() as ws:
        send_paced(ws, tone(1.2))
        get_service(served.app).drain()
        messages, code = received(ws)
    assert final_text(messages).strip()
    assert messages[-1] == {"type": "end", "reason": "shutting_down"}
    assert code == 1001


def test_a_browser_token_opens_live_sessions_and_nothing_else(serve: Callable[..., Served]) -> None:
    """A token from /live/token, offered as a subprotocol, opens a session; it is no key for other routes."""
    served = serve()
    client = keyed(served.app, "browser")
    token = client.post("/live/token").json["token"]
    with served.connect(key=None, subprotocols=["whisper-flask", f"token.{token}"]) as ws:
        assert ws.subprotocol == "whisper-flask"
        send_paced(ws, UTTERANCE)
        ws.send(json.dumps({"type": "end"}))
        messages, _ = received(ws)
    assert final_text(messages).strip()
    assert client.get("/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    status, body = refusal(served, key=None, subprotocols=["whisper-flask", f"token.{token[:-2]}00"])
    assert (status, body["code"]) == (401, "invalid_api_key")


def test_a_revoked_keys_token_no_longer_opens_a_session(serve: Callable[..., Served]) -> None:
    """A token stands for its key: revoking the key refuses the token at once."""
    served = serve()
    token = keyed(served.app, "leaving").post("/live/token").json["token"]
    get_service(served.app).revoke_key("leaving")
    assert refusal(served, key=None, subprotocols=[f"token.{token}"])[0] == 401


def test_a_plain_request_to_the_socket_is_a_json_error(serve: Callable[..., Served]) -> None:
    """GET /ws/transcribe without the WebSocket handshake answers 400 in the JSON error contract."""
    response = keyed(serve().app, "curious").get("/ws/transcribe")
    assert response.status_code == 400 and "code" in response.json


def test_shouted_clipped_speech_is_heard_where_random_bytes_are_refused() -> None:
    """A frame of real speech driven into clipping (louder than random bytes on average) is not taken for noise."""
    speech = np.frombuffer(pcm_of(FIXTURES / "lj001-0001.flac"), "<i2").astype(np.float32)
    loudest = max(
        range(0, len(speech) - 1600, 1600), key=lambda start: float(np.abs(speech[start : start + 1600]).mean())
    )
    shouted = np.clip(speech[loudest : loudest + 1600] * 40, -32768, 32767).astype("<i2")
    assert np.abs(shouted / 32768).mean() > 0.5
    assert len(pcm_samples(shouted.tobytes())) == 1600
    with pytest.raises(InvalidAudio, match="random bytes"):
        pcm_samples(os.urandom(3200))
