"""Long stretches without speech: found by Silero VAD, skipped by Whisper's loop, kept when in doubt."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from whisper.audio import N_FRAMES

from tests.helpers import (
    FIXTURES,
    noise,
    quiet_between,
    submit,
    transcripts,
    wait_for,
    windows_per_step,
    write_wav,
)
from whisper_flask.audio.media import DecodedAudio, MediaDecoder
from whisper_flask.engine.checkpoints import ensure_checkpoint
from whisper_flask.engine.spectrogram import log_mel
from whisper_flask.engine.speech import (
    FRAME_SAMPLES,
    SpeechDetector,
    _has_quiet_stretch,
    clip_timestamps,
    clips_after,
    clips_between,
    non_speech_stretches,
)
from whisper_flask.jobs.registry import JobCancelled

#: Detector frames per second (512 samples at 16 kHz).
RATE = 16000 / FRAME_SAMPLES


def probabilities(*spans: tuple[float, float]) -> np.ndarray:
    """Speech probabilities over (seconds, probability) spans in turn."""
    return np.concatenate([np.full(round(seconds * RATE), p, np.float32) for seconds, p in spans])


def decoded(tmp_path: Path, path: Path) -> tuple[DecodedAudio, torch.Tensor]:
    """The file decoded as the service decodes it, with its spectrogram (unpadded)."""
    audio = MediaDecoder(tmp_path, 3600).decode(path)
    mel = log_mel(audio, 80)
    return audio, mel[:, : mel.shape[-1] - N_FRAMES]


@pytest.fixture(scope="module")
def detector() -> SpeechDetector:
    """The real detector, loaded from its package."""
    loaded = SpeechDetector(30)
    loaded.load()
    return loaded


@pytest.mark.parametrize(
    ("spans", "clips"),
    [
        ([(10, 0.9), (29, 0.1), (10, 0.9)], [(0, 4900)]),  # too short to pay for a window
        ([(10, 0.9), (40, 0.1), (10, 0.9)], [(0, 1100), (4900, 6000)]),  # a second kept on each side
        ([(10, 0.9), (40, 0.4), (10, 0.9)], [(0, 6000)]),  # unsure: kept
        ([(40, 0.1), (10, 0.9), (40, 0.1)], [(3900, 5100)]),  # at the ends, only the side by speech keeps a margin
        ([(10, 0.9), (20, 0.1), (0.5, 0.9), (20, 0.1), (10, 0.9)], [(0, 6050)]),  # a word breaks the stretch
    ],
)
def test_only_stretches_of_30_s_heard_as_no_speech_are_skipped(
    spans: list[tuple[float, float]], clips: list[tuple[int, int]]
) -> None:
    heard = probabilities(*spans)
    frames = len(heard) * FRAME_SAMPLES // 160  # the audio ends in the detector's last frame
    got = clips_between(non_speech_stretches(heard, 30), frames)
    assert len(got) == len(clips) and np.allclose(got, clips, atol=4), got  # detector frames are 3.2 frames


def test_a_resumed_loop_is_given_what_is_left_of_its_clips() -> None:
    clips = [(0, 1100), (4900, 6000)]
    assert clip_timestamps(clips_after(clips, 2000), 6000) == "49.00,60.00"
    assert clip_timestamps(clips_after(clips, 500), 6000) == "5.00,11.00,49.00,60.00"
    assert clip_timestamps(clips_after([(0, 6000)], 0), 6000) == "0", "the whole audio: Whisper's default"
    assert clips_after(clips, 6000) == []


def test_the_detector_finds_the_faint_noise_between_real_speech(detector: SpeechDetector, tmp_path: Path) -> None:
    audio, mel = decoded(tmp_path, quiet_between(tmp_path / "gap.wav", 40))
    frames = mel.shape[-1]
    (first, second) = detector.clips(audio, mel, lambda: None)
    assert first[0] == 0 and second[1] == frames
    # The speech is 9.7 s long; the skip keeps a second of margin beside it.
    assert 1000 < first[1] < 1200 and 4800 < second[0] < 4900


def test_with_skipping_off_every_stretch_is_transcribed(tmp_path: Path) -> None:
    audio, mel = decoded(tmp_path, quiet_between(tmp_path / "gap.wav", 40))
    off = SpeechDetector(0)
    off.load()
    assert off.clips(audio, mel, lambda: None) == [(0, mel.shape[-1])]


def test_the_quiet_check_takes_recordings_longer_than_torchs_quantile_does() -> None:
    mel = torch.zeros(1, 2**24 + 1)  # 46.6 hours of frames: torch.quantile refuses so many
    mel[:, :4000] = -1.0  # 40 s 40 dB under the rest
    assert _has_quiet_stretch(mel, 30)
    assert not _has_quiet_stretch(mel, 41)


def test_dense_real_speech_is_kept_whole_without_running_the_detector(detector: SpeechDetector, tmp_path: Path) -> None:
    audio, mel = decoded(tmp_path, FIXTURES / "lj001-chapter-70s.opus")
    blocks: list[int] = []  # the detector checks the job once per block it hears
    assert detector.clips(audio, mel, lambda: blocks.append(1)) == [(0, mel.shape[-1])]
    assert blocks == [], "no stretch of the spectrogram was quiet long enough to need the detector"


def test_the_model_skips_the_quiet_stretch_and_hears_the_speech_on_both_sides(
    make_real_app, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_real_app().test_client()
    job_id = submit(client, quiet_between(tmp_path / "gap.wav", 40))
    wait_for(client, job_id, "completed")
    assert "skipping 3" in caplog.text  # 40 s less a second of margin on each side
    segments = json.loads(transcripts(client, job_id)["json"])["segments"]
    assert all(segment["start"] < 10.8 or segment["start"] >= 48.6 for segment in segments)
    text = " ".join(segment["text"] for segment in segments).lower()
    assert text.count("printing") == 2, text


def test_a_recording_without_speech_completes_empty_without_the_model_running(
    make_real_app, model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_wav(tmp_path / "hum.wav", np.concatenate([noise(5, dbfs=-20), noise(40)]))  # loud, then quiet
    ensure_checkpoint("base", model_dir, allow_download=False)  # multilingual: it could detect a language
    client = make_real_app(MODEL="base").test_client()
    record = wait_for(client, submit(client, tmp_path / "hum.wav"))
    assert (record["status"], record["language"]) == ("completed", None), "no language is guessed from noise"
    assert json.loads(transcripts(client, record["transcription_id"])["json"])["segments"] == []
    assert "skipping 45.0 s" in caplog.text
    assert windows_per_step(caplog) == [], "the model decoded no window"


def test_recordings_heard_at_once_get_the_clips_each_gets_alone(detector: SpeechDetector, tmp_path: Path) -> None:
    audio, mel = decoded(tmp_path, quiet_between(tmp_path / "gap.wav", 40))
    alone = detector.clips(audio, mel, lambda: None)
    assert len(alone) == 2, "the noise between the two utterances is skipped"
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda _: detector.clips(audio, mel, lambda: None), range(3)))
    assert together == [alone] * 3


def test_a_check_that_raises_stops_the_detector_at_its_next_block(detector: SpeechDetector, tmp_path: Path) -> None:
    audio, mel = decoded(tmp_path, quiet_between(tmp_path / "gap.wav", 300))  # two blocks a stream
    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise JobCancelled("gone")

    with pytest.raises(JobCancelled):
        detector.clips(audio, mel, check)
    assert len(calls) == 2
