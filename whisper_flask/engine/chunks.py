"""chunking_strategy: the audio cut at speech pauses into chunks of up to 30 s, decoded side by side.

Whisper's own loop conditions each window on the text before it, so a job's windows follow one
another (or run in a few parts, parts.py). A chunked job trades that context for speed, as
faster-whisper's batched pipeline and WhisperX do: Silero VAD finds the speech, the stretches of speech
are joined into chunks of at most one window, and each chunk is a part of its own, its loop not
conditioned on previous text, as many at once as the job's share of the batch allows
(ARCHITECTURE.md, "The engine").
"""

from __future__ import annotations

import numpy as np
from whisper.audio import CHUNK_LENGTH, FRAMES_PER_SECOND, N_FRAMES, SAMPLE_RATE

from whisper_flask.engine.options import Chunking
from whisper_flask.engine.parts import Part
from whisper_flask.engine.speech import FRAME_SAMPLES, speech_spans

#: A chunk is at most one window (30 s), so its loop runs one encoder pass (more only if its last segment is cut).
MAX_CHUNK_S = float(CHUNK_LENGTH)
#: Speech longer than a window is cut at its least speech-like moment in the second half of the window.
SPLIT_FROM_S = MAX_CHUNK_S / 2
_FRAME_S = FRAME_SAMPLES / SAMPLE_RATE


def plan_chunks(probabilities: np.ndarray, chunking: Chunking, content_frames: int) -> list[Part]:
    """The chunks of a recording of `content_frames` spectrogram frames, in frames, from its detector
    probabilities (speech_probabilities)."""
    spans = speech_spans(
        probabilities,
        threshold=chunking.threshold,
        min_pause_s=chunking.silence_duration_ms / 1000,
        pad_s=chunking.prefix_padding_ms / 1000,
    )
    chunks: list[tuple[float, float]] = []
    for start, end in (piece for span in spans for piece in _within_window(span, probabilities)):
        if chunks and end - chunks[-1][0] <= MAX_CHUNK_S:
            chunks[-1] = (chunks[-1][0], end)
        else:
            # Padding may reach into the chunk before: no audio is transcribed twice.
            chunks.append((max(start, chunks[-1][1]) if chunks else start, end))
    # The detector hears whole frames of 32 ms, so speech may seem to end after the audio. A clip that ends
    # past the spectrogram makes Whisper's loop decode an empty window for ever (openai/whisper#2005).
    frames = [(round(start * FRAMES_PER_SECOND), round(end * FRAMES_PER_SECOND)) for start, end in chunks]
    ends = [min(end, start + N_FRAMES, content_frames) for start, end in frames]
    return [Part(start, end) for (start, _), end in zip(frames, ends, strict=True) if end > start]


def _within_window(span: tuple[float, float], probabilities: np.ndarray) -> list[tuple[float, float]]:
    """The span, cut where speech is least likely into pieces of at most MAX_CHUNK_S."""
    start, end = span
    pieces = []
    while end - start > MAX_CHUNK_S:
        low, high = int((start + SPLIT_FROM_S) / _FRAME_S), int((start + MAX_CHUNK_S) / _FRAME_S)
        cut = (low + int(np.argmin(probabilities[low:high]))) * _FRAME_S
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces
