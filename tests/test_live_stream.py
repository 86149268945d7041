"""A live stream's text on fake decodes (engine/live.py): pieces, the prompt, empty decodes, silence, clearing."""

from __future__ import annotations

import math

import numpy as np
from whisper.audio import SAMPLE_RATE

from tests.helpers import loudness
from whisper_flask.engine.agreement import Word
from whisper_flask.engine.live import MAX_PIECE_S, STEP_S, LiveEvent, LiveEventKind, LiveStream
from whisper_flask.engine.live_window import Hypothesis


def final_texts(events: list[LiveEvent]) -> list[str]:
    """The texts of the final events, in order."""
    return [event.text for event in events if event.kind is LiveEventKind.FINAL]


def test_audio_piled_up_behind_a_busy_model_is_decoded_once_per_piece() -> None:
    """A backlog costs one decode per MAX_PIECE_S of it, not one per STEP_S, and no decode reads past the audio."""
    buffers: list[int] = []

    def decode(audio: np.ndarray, prompt: str) -> Hypothesis:
        buffers.append(len(audio))
        return Hypothesis((), ())

    stream = LiveStream(decode, lambda frame, rate: 1.0)  # every frame speech
    seconds = 2.5 * MAX_PIECE_S
    stream.feed(np.full(int(seconds * SAMPLE_RATE), 0.1, np.float32))
    assert len(buffers) == math.ceil(seconds / MAX_PIECE_S) < seconds / STEP_S
    assert max(buffers) <= seconds * SAMPLE_RATE


def test_text_a_decode_copied_from_the_prompt_never_becomes_final() -> None:
    """Words of the last utterance, said again by a decode after what is new, are dropped as the prompt's copy."""
    said = " one two three four five six seven"

    def decode(audio: np.ndarray, prompt: str) -> Hypothesis:
        text = " eight" + said if prompt else said
        return Hypothesis(tuple(Word(f" {w}", 0.1 * i, 0.1 * i + 0.1) for i, w in enumerate(text.split())), ())

    stream = LiveStream(decode, lambda frame, rate: 1.0)  # every frame speech
    second = np.full(SAMPLE_RATE, 0.1, np.float32)
    stream.feed(second)
    first = [event.text for event in stream.commit() if event.kind is LiveEventKind.FINAL]
    stream.feed(second)
    again = [event.text for event in stream.commit() if event.kind is LiveEventKind.FINAL]
    assert [text.split() for text in first] == [said.split()] and [text.split() for text in again] == [["eight"]]


def test_words_shown_as_partial_are_not_lost_when_the_last_decode_hears_nothing() -> None:
    """An utterance whose last decodes Whisper drops (no words) ends with its partial text made final."""
    said = " although the Chinese took impressions"
    decodes: list[int] = []

    def decode(audio: np.ndarray, prompt: str) -> Hypothesis:
        decodes.append(len(audio))
        heard = said.split() if len(decodes) == 1 else []
        return Hypothesis(tuple(Word(f" {w}", 0.3 * i, 0.3 * i + 0.3) for i, w in enumerate(heard)), ())

    stream = LiveStream(decode, lambda frame, rate: 1.0)  # every frame speech
    step = np.full(int(STEP_S * SAMPLE_RATE), 0.1, np.float32)
    partials = [event.text for event in stream.feed(step) + stream.feed(step) if event.kind is LiveEventKind.PARTIAL]
    finals = [event.text for event in stream.commit() if event.kind is LiveEventKind.FINAL]
    assert len(decodes) == 3 and partials == [said] and finals == [said]


def test_a_buffer_without_speech_is_never_decoded() -> None:
    """Once a trim leaves only silence, neither the next steps nor the commit decode it (commits by the client)."""
    buffers: list[np.ndarray] = []

    def decode(audio: np.ndarray, prompt: str) -> Hypothesis:
        buffers.append(audio)
        heard = np.flatnonzero(np.abs(audio) > 0.01)
        if not len(heard):  # what Whisper wrote for a pause after its prompt on the Kathleen recording
            return Hypothesis((Word(" I'm", 0.0, 0.2), Word(" sorry.", 0.2, 0.4)), ())
        end = (heard[-1] + 1) / SAMPLE_RATE
        said = " one two three".split()
        return Hypothesis(tuple(Word(f" {w}", end * i / 3, end * (i + 1) / 3) for i, w in enumerate(said)), (end,))

    stream = LiveStream(decode, loudness, commit_on_pause=False)
    speech_s = 140 * 512 / SAMPLE_RATE  # whole detector frames, so that no frame is half speech
    events = stream.feed(np.full(int(speech_s * SAMPLE_RATE), 0.1, np.float32))
    for seconds in (0.5, 1.0, 1.0):  # decoded twice more (the second trims to silence), then silence only
        events += stream.feed(np.zeros(int(seconds * SAMPLE_RATE), np.float32))
    events += stream.commit()
    assert "".join(final_texts(events)) == " one two three"
    assert len(buffers) == 3 and all(np.abs(audio).max() > 0.01 for audio in buffers)


def test_speech_going_on_when_the_buffer_is_cleared_is_heard_from_the_clear() -> None:
    """A clear drops what came before it; the speech after it, in the same utterance, is still decoded."""
    buffers: list[np.ndarray] = []

    def decode(audio: np.ndarray, prompt: str) -> Hypothesis:
        buffers.append(audio)
        return Hypothesis((), ())

    stream = LiveStream(decode, loudness)
    stream.feed(np.full(SAMPLE_RATE, 0.1, np.float32))
    stream.clear()
    before = len(buffers)
    stream.feed(np.full(SAMPLE_RATE, 0.2, np.float32))
    stream.commit()
    assert len(buffers) > before and all(np.abs(audio).min() > 0.15 for audio in buffers[before:])
