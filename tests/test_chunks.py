"""chunking_strategy: speech cut at pauses into chunks of at most a window, decoded side by side without context."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from whisper.audio import FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES, SAMPLE_RATE

from bench.peers import word_error_rate
from tests.helpers import (
    FIXTURES,
    LiveClient,
    assert_same_json_transcript,
    submit,
    transcribing,
    transcripts,
    upload,
    wait_for,
    wait_until,
)
from tests.servers import AudioSite, Servers
from whisper_flask.engine.chunks import plan_chunks
from whisper_flask.engine.options import Chunking, TranscribeOptions
from whisper_flask.engine.parts import Part
from whisper_flask.engine.speech import FRAME_SAMPLES
from whisper_flask.extension import get_service
from whisper_flask.jobs.resume import load_resume

CHAPTER = FIXTURES / "lj001-chapter-70s.opus"  # LJ001-0001 to 0010 read with 0.35 s pauses
CHAPTER_TEXT = (FIXTURES / "lj001-chapter-70s.txt").read_text()
FRAMES_PER_S = SAMPLE_RATE / FRAME_SAMPLES  # detector frames


def probabilities(*speech: tuple[float, float], seconds: float, low: float = 0.05) -> np.ndarray:
    """Detector probabilities: 0.9 in each (start, end) span of speech, `low` elsewhere."""
    heard = np.full(int(seconds * FRAMES_PER_S), low, np.float32)
    for start, end in speech:
        heard[int(start * FRAMES_PER_S) : int(end * FRAMES_PER_S)] = 0.9
    return heard


def chunked(heard: np.ndarray, **settings: Any) -> list[Part]:
    """The chunks of a recording as long as the detector heard, with these settings."""
    return plan_chunks(heard, Chunking(**settings), len(heard) * FRAME_SAMPLES // HOP_LENGTH)


def seconds(parts: list[Part]) -> list[tuple[float, float]]:
    """The parts' spans in seconds, to 0.1 s."""
    return [(round(part.start / FRAMES_PER_SECOND, 1), round(part.end / FRAMES_PER_SECOND, 1)) for part in parts]


# -- cutting -------------------------------------------------------------------------------------------


def test_stretches_of_speech_are_joined_into_chunks_of_at_most_a_window_padded_before_and_after() -> None:
    heard = probabilities((1, 11), (12, 22), (23, 33), (40, 45), seconds=50)
    chunks = seconds(chunked(heard, prefix_padding_ms=300))
    assert chunks == [(0.7, 22.3), (22.7, 45.3)]
    assert all(part.end - part.start <= N_FRAMES for part in chunked(heard))


def test_a_pause_shorter_than_the_silence_duration_does_not_end_a_stretch_of_speech() -> None:
    heard = probabilities((0, 20), (20.5, 28), (45, 50), seconds=60)
    assert seconds(chunked(heard, silence_duration_ms=1000, prefix_padding_ms=0)) == [(0, 28), (45, 50)]


def test_speech_longer_than_a_window_is_cut_where_speech_is_least_likely() -> None:
    heard = probabilities((0, 70), seconds=70)
    heard[int(24 * FRAMES_PER_S)] = 0.6  # a breath: less speech-like than the rest, but still speech
    heard[int(50 * FRAMES_PER_S)] = 0.7
    chunks = chunked(heard, prefix_padding_ms=0)
    assert seconds(chunks) == [(0, 24), (24, 50), (50, 70)]


def test_no_chunk_ends_after_the_audio_though_the_detector_hears_whole_frames() -> None:
    heard = probabilities((0, 10.02), seconds=10.02)
    assert plan_chunks(heard, Chunking(), 1000) == [Part(0, 1000)]


def test_padding_never_makes_two_chunks_overlap() -> None:
    heard = probabilities((0, 29.5), (30, 40), seconds=40)
    chunks = chunked(heard, prefix_padding_ms=2000, silence_duration_ms=0)
    assert all(first.end <= second.start for first, second in zip(chunks, chunks[1:], strict=False))
    assert seconds(chunks)[-1][1] == 40


@pytest.mark.parametrize("threshold, count", [(0.5, 1), (0.95, 0)])
def test_the_threshold_decides_what_counts_as_speech(threshold: float, count: int) -> None:
    heard = probabilities((5, 10), seconds=20)
    assert len(chunked(heard, threshold=threshold)) == count


def test_a_chunk_is_decoded_once_without_timestamps_nor_the_text_before_it() -> None:
    keywords = TranscribeOptions(language="en", chunking_strategy=Chunking()).whisper_keywords()
    assert keywords == {"language": "en", "condition_on_previous_text": False, "without_timestamps": True}


# -- asking for it ---------------------------------------------------------------------------------------

SERVER_VAD = {"type": "server_vad", "threshold": 0.6, "prefix_padding_ms": 100, "silence_duration_ms": 500}


@pytest.mark.parametrize(
    "fields, stored",
    [
        ({"chunking_strategy": "auto"}, Chunking().as_dict()),
        ({"chunking_strategy": json.dumps(SERVER_VAD)}, SERVER_VAD),
        ({f"chunking_strategy[{name}]": str(value) for name, value in SERVER_VAD.items()}, SERVER_VAD),
        (
            {"chunking_strategy": '{"type": "server_vad", "threshold": "0.6"}'},
            {**Chunking().as_dict(), "threshold": 0.6},
        ),
    ],
    ids=["auto", "json-text", "bracketed-fields", "number-as-text"],
)
def test_a_form_asks_for_chunks_as_auto_as_json_text_or_as_bracketed_fields(
    client: FlaskClient, fields: dict[str, str], stored: dict[str, Any]
) -> None:
    response = upload(client, **fields)
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["options"]["chunking_strategy"] == stored


def test_a_json_body_gives_the_chunking_strategy_as_an_object(client: FlaskClient, audio_site: AudioSite) -> None:
    response = client.post("/upload", json={"url": audio_site.url("/fox.wav"), "chunking_strategy": SERVER_VAD})
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["options"]["chunking_strategy"] == SERVER_VAD


@pytest.mark.parametrize(
    "value, field",
    [
        ("sometimes", "chunking_strategy"),
        ('{"type": "semantic_vad"}', "chunking_strategy"),
        ('{"type": "server_vad", "eagerness": "low"}', "chunking_strategy"),
        ('["server_vad"]', "chunking_strategy"),
        ('{"type": "server_vad", "threshold": 2}', "chunking_strategy[threshold]"),
        ('{"type": "server_vad", "threshold": true}', "chunking_strategy[threshold]"),
        ('{"type": "server_vad", "prefix_padding_ms": 0.5}', "chunking_strategy[prefix_padding_ms]"),
        ('{"type": "server_vad", "silence_duration_ms": -1}', "chunking_strategy[silence_duration_ms]"),
    ],
)
def test_a_chunking_strategy_that_is_not_auto_or_server_vad_is_refused_naming_the_field(
    client: FlaskClient, value: str, field: str
) -> None:
    response = upload(client, chunking_strategy=value)
    assert response.status_code == 400
    assert (response.get_json()["code"], response.get_json()["field"]) == ("invalid_option", field)
    assert "eagerness" not in response.get_json()["error"]  # the client's own names are not echoed


# -- the real model --------------------------------------------------------------------------------------


def transcript(app: Flask, job_id: str, fmt: str = "txt") -> str:
    """A finished job's transcript."""
    return (get_service(app).settings.TRANSCRIPT_DIR / f"{job_id}.{fmt}").read_text()


def test_a_chunked_job_transcribes_each_chunk_once_as_accurately_as_the_default(
    make_real_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = make_real_app()
    default = submit(app.test_client(), CHAPTER)
    wait_for(app.test_client(), default, "completed", timeout=300)
    chunked = submit(app.test_client(), CHAPTER, chunking_strategy="auto")
    wait_for(app.test_client(), chunked, "completed", timeout=300)

    assert "transcribing 3 chunks of speech" in caplog.text
    segments = json.loads(transcript(app, chunked, "json"))["segments"]
    assert len(segments) == 3  # each chunk decoded once, as one segment
    starts = [segment["start"] for segment in segments]
    assert starts == sorted(starts) and segments[-1]["end"] <= 70.5
    assert [segment["id"] for segment in segments] == list(range(len(segments)))
    chunked_wer = word_error_rate(CHAPTER_TEXT, transcript(app, chunked))
    assert chunked_wer <= word_error_rate(CHAPTER_TEXT, transcript(app, default)) + 0.02
    assert chunked_wer < 0.1


def test_a_chunked_job_stopped_part_way_resumes_to_the_uninterrupted_transcript(
    make_real_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    first = make_real_app(BATCH_SIZE=1)  # one chunk at a time: the stop comes with chunks still to do
    alone = submit(first.test_client(), CHAPTER, chunking_strategy="auto")
    wait_for(first.test_client(), alone, "completed", timeout=300)
    expected = transcript(first, alone, "json")

    interrupted = submit(first.test_client(), CHAPTER, chunking_strategy="auto")
    service = get_service(first)
    deadline = time.monotonic() + 300
    while not ((window := load_resume(service.settings.TRANSCRIPT_DIR, interrupted)) and any(
            part["done"] for part in window.parts)):  # fmt: skip
        assert time.monotonic() < deadline, f"job {interrupted}'s first chunk never ended"
        time.sleep(0.05)
    service.stop()
    assert service.parts.registry.view(interrupted).job.status.value == "pending"

    restarted = make_real_app(BATCH_SIZE=1)
    registry = get_service(restarted).parts.registry
    while not registry.view(interrupted).job.status.terminal:
        assert time.monotonic() < deadline, f"job {interrupted} did not finish after the restart"
        time.sleep(0.1)
    assert f"job {interrupted} resumes at" in caplog.text
    assert_same_json_transcript(transcript(restarted, interrupted, "json").encode(), expected.encode())


def test_a_chunked_job_killed_mid_way_resumes_once_to_the_undisturbed_transcript(
    servers: Servers, api_key: str
) -> None:
    port, server = servers.gunicorn(MAX_WORKERS="1", BATCH_SIZE="1")  # one chunk at a time
    client = LiveClient(port, api_key)
    killed = submit(client, CHAPTER, chunking_strategy="auto")
    wait_until(client, killed, transcribing)  # a chunk has ended: its segments are in the resume state
    os.killpg(server.pid, signal.SIGKILL)  # power loss: arbiter and worker die at once
    server.wait(timeout=30)

    servers.gunicorn(MAX_WORKERS="1", BATCH_SIZE="1")
    record = wait_for(client, killed, timeout=300)
    assert (record["status"], record["attempts"]) == ("completed", 2)
    assert f"job {killed} resumes at" in (servers.work / "logs" / "whisper_flask.log").read_text()
    undisturbed = submit(client, CHAPTER, chunking_strategy="auto")
    wait_for(client, undisturbed, "completed", timeout=300)
    got, expected = transcripts(client, killed), transcripts(client, undisturbed)
    assert got["txt"] == expected["txt"] and got["srt"] == expected["srt"]
    assert_same_json_transcript(got["json"], expected["json"])
