"""A live buffer decoded as one short window: a decode that starts its text over is ended where the repeat begins; a
session without a language keeps one once Whisper is sure of it; the encoder is the session's own."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import whisper
from whisper.audio import FRAMES_PER_SECOND, SAMPLE_RATE

from tests.helpers import FIXTURES, SPOKEN, base_config, done_within, start_model_thread, stream_final_text
from whisper_flask.engine import engine as engine_module
from whisper_flask.engine import live_window
from whisper_flask.engine.batching import ModelThread, whisper_projection
from whisper_flask.engine.checkpoints import ensure_checkpoint
from whisper_flask.engine.engine import WhisperEngine
from whisper_flask.engine.live import LiveStream
from whisper_flask.engine.live_window import (
    CONTEXT_MARGIN_S,
    REPEAT_TOKENS,
    SURE_LANGUAGE,
    SURE_LANGUAGE_AFTER_S,
    LiveDecoder,
    RepeatStop,
    heard_language,
)
from whisper_flask.engine.options import Task
from whisper_flask.engine.quantize import FbgemmInt8Linear, StageArithmetic, fbgemm
from whisper_flask.engine.speech import SpeechDetector
from whisper_flask.settings import Settings

EOT = 100
PROMPT = [101, 7, 102]  # what precedes the sampled tokens (the sot sequence, here with a prompt token)


def steps(repeats: RepeatStop, sampled: list[int]) -> torch.Tensor:
    """Run the filter as DecodingTask does, once per step, over `sampled`; the logits of the step after the last."""
    logits = torch.zeros(1, 110)
    for length in range(len(sampled) + 1):
        logits = torch.zeros(1, 110)
        repeats.apply(logits, torch.tensor([PROMPT + sampled[:length]]))
    return logits


def test_a_decode_that_starts_its_text_over_may_only_end_and_keeps_what_came_before() -> None:
    """Once six text tokens come a second time (timestamps aside), only the end of text may follow."""
    said = [105, 1, 2, 3, 4, 5, 6, 8, 106]  # a timestamp, text, a timestamp
    again = [107, 1, 2, 3, 4, 5, 6]
    repeats = RepeatStop(EOT)
    logits = steps(repeats, said + again)
    assert repeats.kept == len(said) + 1  # the repeat's first text token, after its timestamp
    assert logits[0, EOT] == 0 and bool((logits[0, :EOT] == -math.inf).all())
    assert bool((logits[0, EOT + 1 :] == -math.inf).all())


def test_one_word_said_over_and_over_is_cut_after_its_first_run() -> None:
    """The same token again and again is a repeat as soon as REPEAT_TOKENS + 1 of them have come."""
    repeats = RepeatStop(EOT)
    steps(repeats, [9] * (REPEAT_TOKENS + 1))
    assert repeats.kept == 1


def test_text_that_never_repeats_six_tokens_is_left_alone() -> None:
    """Speech that repeats shorter runs ("of the ... of the") keeps every token and its logits."""
    sampled = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 8]
    repeats = RepeatStop(EOT)
    logits = steps(repeats, sampled)
    assert repeats.kept is None
    assert bool((logits == 0).all())


@pytest.fixture(scope="module")
def base(model_dir: Path) -> Iterator[tuple[whisper.Whisper, ModelThread]]:
    """The multilingual base model in fp32 on a model thread of its own."""
    model = whisper.load_model(str(ensure_checkpoint("base", model_dir, allow_download=False)))
    thread = start_model_thread(model, whisper_projection(model.decoder))
    yield model, thread
    thread.stop()


def fails_if_run(*args: Any) -> None:
    """A forward hook on an encoder that must not run."""
    raise AssertionError("the file jobs' encoder ran")


@pytest.mark.parametrize(("recording", "heard"), [("fox.wav", "quick brown fox"), ("german.wav", "guten morgen")])
def test_a_session_without_a_language_hears_it_in_its_first_buffer_with_its_own_encoder(
    base: tuple[whisper.Whisper, ModelThread], recording: str, heard: str
) -> None:
    """A multilingual session given no language writes its first buffer in the language spoken, and only the
    encoder it was given runs."""
    model, thread = base
    own = copy.deepcopy(model.encoder)
    # whisper.detect_language would take the short features for a spectrogram and run the model's encoder.
    hook = model.encoder.conv1.register_forward_hook(fails_if_run)
    decoder = LiveDecoder(model, thread, None, Task.TRANSCRIBE, encoder=own)
    audio = whisper.load_audio(str(FIXTURES / recording))[: 4 * SAMPLE_RATE]
    try:
        words = done_within(60, lambda: decoder(audio, "")).words
    finally:
        hook.remove()
    assert heard in "".join(word.text for word in words).lower()


def test_a_session_without_a_language_keeps_one_only_once_whisper_is_sure_of_it(
    base: tuple[whisper.Whisper, ModelThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streamed at real-time pace, a Spanish sentence whose first buffers Whisper hears as other languages is
    written in Spanish: each decode hears the language again until one is sure (SURE_LANGUAGE) in a buffer of
    SURE_LANGUAGE_AFTER_S or more, and none after it."""
    model, thread = base
    heard: list[tuple[str, float, float]] = []  # language, probability, seconds of audio in the buffer

    def hear(model: whisper.Whisper, features: torch.Tensor) -> tuple[str, float]:
        language, probability = heard_language(model, features)
        heard.append((language, probability, features.shape[1] / FRAMES_PER_SECOND * 2 - CONTEXT_MARGIN_S))
        return language, probability

    monkeypatch.setattr(live_window, "heard_language", hear)
    detector = SpeechDetector(30)
    detector.load()
    decoder = LiveDecoder(model, thread, None, Task.TRANSCRIBE, encoder=model.encoder)
    audio = whisper.load_audio(str(FIXTURES / "picovoice-test-es.opus"))
    text = done_within(120, lambda: stream_final_text(LiveStream(decoder, detector.stream_detector()), audio)).lower()
    assert "arenas son blan" in text and "grano medio" in text, text

    def sure(probability: float, seconds: float) -> bool:
        return probability >= SURE_LANGUAGE and seconds >= SURE_LANGUAGE_AFTER_S - 0.02  # frames come in pairs

    assert heard[-1][0] == "es" and sure(*heard[-1][1:]), heard
    assert len(heard) > 1 and not any(sure(probability, seconds) for _, probability, seconds in heard[:-1]), heard


@pytest.mark.parametrize("recording", ["fox.wav", "german.wav", "mls-es-13697-11991-000000.opus"])
def test_the_language_heard_is_whispers_own_detection_on_a_whole_window(
    base: tuple[whisper.Whisper, ModelThread], recording: str
) -> None:
    """On a whole window's features, heard_language names the language whisper.detect_language finds likeliest."""
    model, _ = base
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(whisper.load_audio(str(FIXTURES / recording))))
    with torch.no_grad():
        features = model.encoder(mel[None])
        probabilities = model.detect_language(features)[1][0]
    likeliest = max(probabilities, key=lambda code: probabilities[code])
    assert heard_language(model, features) == (likeliest, pytest.approx(probabilities[likeliest], abs=1e-4))


@pytest.mark.skipif(not fbgemm(), reason="torch has no fbgemm kernels on this CPU")
def test_where_file_jobs_encoder_runs_int8_fbgemm_a_live_session_runs_an_encoder_of_its_own(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With auto's choice for file jobs' encoder int8-fbgemm and live sessions' fp32, a session's words come from an
    encoder of its own: the model's (int8-fbgemm) never runs for it."""
    chosen = StageArithmetic("int8-fbgemm", "none", "none")
    monkeypatch.setattr(engine_module, "measured_arithmetic", lambda *args: chosen)
    engine = WhisperEngine()
    engine.start(Settings.load({**base_config(tmp_path), "MODEL_DIR": model_dir, "QUANTIZE": "auto"}))
    try:
        model = engine.wait_until_ready(timeout=120)
        assert any(isinstance(module, FbgemmInt8Linear) for module in model.encoder.modules())
        model.encoder.conv1.register_forward_hook(fails_if_run)
        audio = whisper.load_audio(str(FIXTURES / "fox.wav"))

        def session() -> str:  # one thread opens and feeds the stream, as a session's does
            return stream_final_text(engine.open_stream("en", Task.TRANSCRIBE, commit_on_pause=True), audio)

        text = done_within(120, session).lower()
    finally:
        engine.stop()
    assert all(words in text for words in SPOKEN["fox.wav"]), text
