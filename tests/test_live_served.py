"""Live transcription as deployed: the real tiny.en model in gunicorn behind the shipped nginx, real speech at real-time
pace, over both protocols."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from typing import Any

import pytest
from openai import OpenAI
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from bench.peers import word_error_rate
from tests.helpers import (
    LiveClient,
    create_key,
    eventually,
    final_text,
    pcm_of,
    received,
    send_paced,
    send_stream_paced,
    submit,
    wait_for,
    webm_of,
)
from tests.servers import FIXTURES, Servers

RECORDING = FIXTURES / "lj001-0001.flac"  # 10 s of LJSpeech, one sentence
REFERENCE = (
    "Printing, in the only sense with which we are at present concerned, differs from most if not from all the arts"
    " and crafts represented in the Exhibition"
)


@pytest.fixture(scope="module")
def deployed(module_servers: Servers) -> dict[str, Any]:
    """gunicorn with one live session at most, the shipped nginx in front, and a key."""
    key = create_key(module_servers.work, "speaker")
    gunicorn, _ = module_servers.gunicorn(MAX_LIVE_SESSIONS="1")
    nginx, _ = module_servers.nginx()
    return {"key": key, "gunicorn": gunicorn, "nginx": nginx}


def open_socket(deployed: dict[str, Any], path: str = "/ws/transcribe") -> ClientConnection:
    """A WebSocket through nginx, with the key in its header."""
    headers = {"Authorization": f"Bearer {deployed['key']}"}
    return connect(f"ws://127.0.0.1:{deployed['nginx']}{path}", additional_headers=headers, open_timeout=30)


def test_speech_streamed_through_nginx_comes_back_as_partial_then_final_text(deployed: dict[str, Any]) -> None:
    """Real speech at real-time pace: partial (tentative) text along the way, and final text as good as the file's."""
    with open_socket(deployed) as ws:
        send_paced(ws, pcm_of(RECORDING))
        ws.send(json.dumps({"type": "end"}))
        messages, code = received(ws, timeout=60)
    kinds = [message["type"] for message in messages]
    assert "partial" in kinds and code == 1000
    client = LiveClient(deployed["gunicorn"], deployed["key"])
    job = submit(client, RECORDING)
    wait_for(client, job, "completed")
    file_text = client.get(f"/download/{job}.txt").data.decode()
    assert word_error_rate(REFERENCE, final_text(messages)) <= word_error_rate(REFERENCE, file_text) + 0.05


def test_a_browsers_webm_opus_stream_through_nginx_comes_back_as_text(deployed: dict[str, Any]) -> None:
    """Real speech encoded as a MediaRecorder's WebM/Opus, sent in pieces at real-time pace: its words come back."""
    pcm = pcm_of(RECORDING)
    with open_socket(deployed, "/ws/transcribe?input_audio_format=webm") as ws:
        send_stream_paced(ws, webm_of(pcm), len(pcm) / 32000, frame_s=0.25)
        ws.send(json.dumps({"type": "end"}))
        messages, code = received(ws, timeout=60)
    assert "partial" in [message["type"] for message in messages] and code == 1000
    assert word_error_rate(REFERENCE, final_text(messages)) <= 0.15, final_text(messages)


def test_openais_client_transcribes_speech_through_nginx(deployed: dict[str, Any]) -> None:
    """OpenAI's client, 24 kHz PCM16 appends at real-time pace: its completed transcripts hold the speech."""
    base = f"127.0.0.1:{deployed['nginx']}/v1"
    client = OpenAI(api_key=deployed["key"], base_url=f"http://{base}", websocket_base_url=f"ws://{base}")
    pcm = pcm_of(RECORDING, rate=24000)
    transcripts = []
    with client.realtime.connect(extra_query={"intent": "transcription"}, max_retries=0) as connection:
        assert connection.recv().type == "session.created"

        def speak() -> None:
            for index in range(0, len(pcm), 4800):  # 100 ms a frame, paced by the send loop below
                connection.input_audio_buffer.append(audio=base64.b64encode(pcm[index : index + 4800]).decode())
                time.sleep(0.1)
            connection.input_audio_buffer.commit()

        speaker = threading.Thread(target=speak)
        speaker.start()
        while True:
            event = connection.recv()
            if event.type == "conversation.item.input_audio_transcription.completed":
                transcripts.append(event.transcript)
                if not speaker.is_alive():
                    break
        speaker.join()
    heard = " ".join(transcripts)
    assert word_error_rate(REFERENCE, heard) <= 0.25, heard


def test_a_client_that_vanishes_mid_sentence_frees_its_slot_at_once(deployed: dict[str, Any]) -> None:
    """A client gone without a close frame (its network dropped) leaves no session behind: the next is let in."""
    ws = open_socket(deployed)
    send_paced(ws, pcm_of(RECORDING)[: 16000 * 2 * 3])  # 3 s: mid-sentence
    ws.socket.close()

    def admitted() -> bool:
        try:
            open_socket(deployed).close()
        except InvalidStatus:
            return False
        return True

    eventually(admitted, 10, "the vanished client's session still holds the only slot")


def test_past_the_bound_the_handshake_is_refused_with_a_json_error(deployed: dict[str, Any]) -> None:
    """With MAX_LIVE_SESSIONS=1, a second session through nginx is refused 503 busy, in the JSON error contract."""
    with open_socket(deployed), pytest.raises(InvalidStatus) as refused:
        open_socket(deployed)
    assert refused.value.response.status_code == 503
    assert json.loads(refused.value.response.body)["code"] == "busy"


def test_a_session_works_under_the_shipped_sub_path(deployed: dict[str, Any], module_servers: Servers) -> None:
    """Behind the /speech/ snippet the socket is /speech/ws/transcribe, and its speech comes back as text."""
    port, nginx = module_servers.nginx(subpath=True)
    headers = {"Authorization": f"Bearer {deployed['key']}"}
    with connect(f"ws://127.0.0.1:{port}/speech/ws/transcribe", additional_headers=headers, open_timeout=30) as ws:
        send_paced(ws, pcm_of(RECORDING)[: 16000 * 2 * 4])  # "Printing, in the only sense"
        ws.send(json.dumps({"type": "end"}))
        messages, code = received(ws, timeout=60)
    module_servers.stop(nginx)
    assert "printing" in final_text(messages).lower() and code == 1000


def test_a_saved_session_cut_off_by_sigkill_becomes_its_keys_job_at_the_next_start(servers: Servers) -> None:
    """SIGKILL mid-session: the next start queues the saved session's audio so far as the key's job, transcribed."""
    key = create_key(servers.work, "speaker")
    port, process = servers.gunicorn()
    pcm = pcm_of(RECORDING)
    half = len(pcm) // 4 * 2
    recordings = servers.work / "uploads"
    with contextlib.suppress(ConnectionClosed):
        headers = {"Authorization": f"Bearer {key}"}
        with connect(f"ws://127.0.0.1:{port}/ws/transcribe?save=true", additional_headers=headers) as ws:
            ws.send(pcm[:half])  # all 10 s at once: within 10 s of real time
            ws.send(pcm[half:])
            eventually(lambda: any(path.stat().st_size > len(pcm) for path in recordings.glob(".live-*.wav")), 60,
                       "the session's audio never reached the disk")  # fmt: skip
            servers.stop(process)  # SIGKILL, the session still open
    servers.gunicorn()
    client = LiveClient(port, key)
    jobs = client.get("/jobs").get_json()["jobs"]
    assert [job["filename"] for job in jobs] == ["live-session.wav"]
    wait_for(client, jobs[0]["transcription_id"], "completed")
    text = client.get(f"/download/{jobs[0]['transcription_id']}.txt").data.decode()
    assert word_error_rate(REFERENCE, text) <= 0.1
    assert not list(recordings.glob(".live-*"))
