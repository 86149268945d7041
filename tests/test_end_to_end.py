"""The user's whole path through the HTTP API on the real tiny.en model and real speech."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from tests.helpers import (
    FIXTURES,
    SPOKEN,
    assert_same_json_transcript,
    eventually,
    needs_bf16_kernels,
    speech,
    submit,
    transcripts,
    wait_for,
    wav_bytes,
    windows_per_step,
)
from whisper_flask.audio.subprocesses import media_tool
from whisper_flask.engine.quantize import StageArithmetic, onednn_bf16


@pytest.mark.parametrize("quantize", ["none", "int8", "bf16", "fp16"])
def test_spoken_words_come_back_in_every_format(
    make_real_app: Callable[..., Flask], quantize: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="whisper_flask.engine.engine"):
        client = make_real_app(QUANTIZE=quantize).test_client()
    stages = StageArithmetic.chosen(quantize if quantize != "bf16" or onednn_bf16() else "none")  # bf16 needs kernels
    logged = f"(encoder: {stages.encoder}, decoder: {stages.decoder}, live sessions' encoder: {stages.live_encoder})"
    assert logged in caplog.text
    job_id = submit(client, FIXTURES / "fox.wav")
    done = wait_for(client, job_id, "completed", "failed")
    assert done["status"] == "completed" and done["language"] == "en"
    files = {fmt: data.decode("utf-8").lower() for fmt, data in transcripts(client, job_id).items()}
    for fmt, text in files.items():
        for words in SPOKEN["fox.wav"]:
            assert words in text, f"{words!r} missing from the {fmt} transcript: {text!r}"
    assert files["srt"].startswith("1\n00:00:00,000 --> ")
    assert files["vtt"].startswith("webvtt")
    assert files["tsv"].startswith("start\tend\ttext")
    assert json.loads(files["json"])["language"] == "en"


@pytest.mark.parametrize("quantize", ["none", "int8", pytest.param("bf16", marks=needs_bf16_kernels), "fp16"])
def test_concurrent_jobs_give_the_transcripts_of_jobs_run_alone(
    make_real_app, tmp_path: Path, caplog: pytest.LogCaptureFixture, quantize: str
) -> None:
    names = list(SPOKEN)
    files = [speech(tmp_path / f"long-{name}", 65, names[i:] + names[:i]) for i, name in enumerate(names)]
    # Two of them align words too: alignment installs hooks on the shared model.
    options = [{"word_timestamps": "true"} if i % 2 else {} for i in range(len(files))]

    one_by_one = make_real_app(MAX_WORKERS=1, QUANTIZE=quantize).test_client()
    alone = []
    for path, fields in zip(files, options, strict=True):
        job_id = submit(one_by_one, path, **fields)
        wait_for(one_by_one, job_id, "completed", timeout=120)
        alone.append(transcripts(one_by_one, job_id))

    at_once = make_real_app(MAX_WORKERS=len(files), QUANTIZE=quantize).test_client()
    with caplog.at_level(logging.DEBUG, logger="whisper_flask.engine.decoding"):
        ids = [submit(at_once, path, **fields) for path, fields in zip(files, options, strict=True)]
        jobs = [wait_for(at_once, job_id, timeout=240) for job_id in ids]
    assert max(windows_per_step(caplog)) > 1, "the windows were never decoded together"

    assert max(job["started_at"] for job in jobs) < min(job["finished_at"] for job in jobs), "jobs did not overlap"
    assert all(job["status"] == "completed" for job in jobs)
    for job_id, expected in zip(ids, alone, strict=True):
        got = transcripts(at_once, job_id)
        if quantize == "int8":
            # Every int8 row and every window's attention is computed apart from the others.
            assert got == expected
            continue
        assert {fmt: got[fmt] for fmt in got if fmt != "json"} == {
            fmt: expected[fmt] for fmt in expected if fmt != "json"
        }
        assert_same_json_transcript(got["json"], expected["json"])
    words = json.loads(alone[1]["json"])["segments"][0]["words"]
    assert words and {"word", "start", "end"} <= set(words[0])


def test_short_job_finishes_within_two_windows_of_a_long_ones_parts(
    make_real_app, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    short = speech(tmp_path / "short.wav", 10, ["fox.wav", "report.wav"])
    long = speech(tmp_path / "long.wav", 300, list(SPOKEN))
    # Two batch places make two long parts: past its first window, each part has several left,
    # so the long job is still running while the short one is decoded and heard.
    client = make_real_app(MAX_WORKERS=2, BATCH_SIZE=2).test_client()
    long_id = submit(client, long)
    eventually(  # the long job is transcribing, past its first window
        lambda: client.get(f"/progress/{long_id}").get_json()["processed_seconds"] > 0,
        timeout=300,
        message=f"the long job {long_id} never got past its first window",
    )

    long_before = client.get(f"/progress/{long_id}").get_json()["processed_seconds"]
    wait_for(client, submit(client, short), "completed", timeout=300)
    long_after = client.get(f"/progress/{long_id}").get_json()

    assert long_after["status"] == "in_progress", "the short job must finish while the long one runs"
    # The long job runs in parts, which took every batch place. The short job's window takes the
    # first place a part's window leaves, so each part moves on by at most two windows meanwhile.
    parts = re.search(r"transcribing in (\d+) parts", caplog.text)
    assert parts and int(parts.group(1)) > 1, "a 300 s job alone runs in parts"
    assert long_after["processed_seconds"] - long_before <= 60 * int(parts.group(1)), (long_before, long_after)
    wait_for(client, long_id, "completed", timeout=300)


def test_progress_follows_the_decoder_window_by_window(make_real_app, tmp_path: Path) -> None:
    client = make_real_app().test_client()
    job_id = submit(client, speech(tmp_path / "ninety.wav", 90, list(SPOKEN)))
    seen, shown = [], []
    deadline = time.monotonic() + 300
    while (body := client.get(f"/progress/{job_id}").get_json())["status"] != "completed":
        assert time.monotonic() < deadline, f"job {job_id} did not complete within 300 s: {body}"
        if body["status"] == "in_progress" and body["stage"] == "transcribing":
            seen.append(body["processed_seconds"])
            shown.append(body["progress"])
        time.sleep(0.02)
    assert seen == sorted(seen), "progress went backwards"
    assert shown == sorted(shown), "the percentage went backwards"
    assert len({s for s in seen if s > 0}) >= 2, f"expected several windows, saw {sorted(set(seen))}"
    assert body["progress"] == 100 and body["processed_seconds"] == 90


@pytest.fixture(scope="module")
def bad_audio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Broken and silent files a user might send."""
    directory = tmp_path_factory.mktemp("bad")
    ffmpeg = media_tool("ffmpeg")

    def encode(name: str, *args: str) -> Path:
        subprocess.run([ffmpeg, "-loglevel", "error", "-y", *args, str(directory / name)], check=True)
        return directory / name

    mp3 = encode("fox.mp3", "-i", str(FIXTURES / "fox.wav"), "-b:a", "32k")
    truncated = directory / "truncated.mp3"
    truncated.write_bytes(mp3.read_bytes()[: mp3.stat().st_size // 2])
    silence = directory / "silence.wav"
    silence.write_bytes(wav_bytes(20, amplitude=0))
    two_hours = encode("two-hours-of-silence.mp3", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "7200",
                       "-b:a", "8k")  # fmt: skip
    return {"truncated": truncated, "silence": silence, "two_hours": two_hours}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("truncated", "quick brown fox"),  # the first half of the sentence
        ("silence", ""),
        ("two_hours", ""),
    ],
)
def test_damaged_and_silent_audio_completes_beside_a_good_job(
    make_real_app, bad_audio: dict[str, Path], tmp_path: Path, case: str, expected: str
) -> None:
    client = make_real_app(MAX_WORKERS=2).test_client()
    good = submit(client, speech(tmp_path / "good.wav", 20, ["garden.wav", "fox.wav", "report.wav"]))
    bad = submit(client, bad_audio[case])
    result = wait_for(client, bad, "completed", "failed", timeout=180)
    assert result["status"] == "completed", result
    text = client.get(f"/download/{bad}.txt").get_data(as_text=True)
    assert (expected in text.lower()) if expected else text == ""
    assert wait_for(client, good, "completed", "failed", timeout=180)["status"] == "completed"
    assert "yellow flowers" in client.get(f"/download/{good}.txt").get_data(as_text=True).lower()
    assert client.get("/queue").get_json()["in_progress"] == 0


@pytest.mark.parametrize(
    ("fields", "data", "code"),
    [
        ({}, b"", "empty_file"),
        ({"language": "xx-unknown"}, None, "invalid_option"),
        ({"temperature": "-0.5"}, None, "invalid_option"),
    ],
)
def test_bad_requests_are_refused_without_touching_a_running_job(
    make_real_app, tmp_path: Path, fields: dict[str, str], data: bytes | None, code: str
) -> None:
    client = make_real_app().test_client()
    good = submit(client, speech(tmp_path / "good.wav", 20, ["garden.wav", "fox.wav", "report.wav"]))
    audio = (FIXTURES / "fox.wav").read_bytes() if data is None else data
    response = client.post("/upload", data={"file": (io.BytesIO(audio), "x.wav"), **fields})
    assert response.status_code == 400 and response.get_json()["code"] == code
    assert wait_for(client, good, "completed", "failed", timeout=120)["status"] == "completed"


def test_detect_language_with_the_multilingual_base_model(make_real_app, model_dir: Path) -> None:
    client = make_real_app(MODEL="base").test_client()
    with (FIXTURES / "german.wav").open("rb") as audio:
        response = client.post("/detect-language", data={"file": (audio, "german.wav")})
    body = response.get_json()
    assert response.status_code == 200, body
    assert body["language"] == "de" and body["probability"] > 0.5
    assert body["top"][0] == {"language": "de", "probability": body["probability"]}
