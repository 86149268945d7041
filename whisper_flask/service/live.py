"""Live sessions: bounded in number, their audio checked, ended by the service's stop, saved as jobs on request.

A session holds an HTTP thread for as long as it lasts, so at most MAX_LIVE_SESSIONS run at once and
more are refused with Busy (slots.py). Its text comes from a LiveStream (engine/live.py) on the shared
model; its audio is 16 kHz 16-bit mono PCM, checked before the stream hears it (ARCHITECTURE.md,
"Live transcription").
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from whisper_flask.audio.resample import Resampler
from whisper_flask.engine.engine import Engine
from whisper_flask.engine.live import LiveEvent, LiveStream
from whisper_flask.engine.options import Task, TranscribeOptions
from whisper_flask.exceptions import InvalidAudio, InvalidOption, ShuttingDown
from whisper_flask.files import create_private
from whisper_flask.jobs.records import JobView, Submission
from whisper_flask.jobs.retention import INCOMING_PREFIX
from whisper_flask.service.slots import RequestSlots

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
#: Audio may arrive this far ahead of real time (a client catching up after a stall), no further: a live
#: session is paced by a speaker, and a faster one would take the model from everyone else.
AHEAD_S = 10.0
#: Random bytes read as PCM: a mean level near 0.5 of full scale, and no correlation between one sample and
#: the next. Sound is never both: a microphone's gain control took speech to 0.39 in a 100 ms frame, and
#: speech's neighbouring samples correlate far above 0.3 (its energy lies below a quarter of the rate).
NOISE_LEVEL, NOISE_CORRELATION = 0.25, 0.3
#: The first bytes of containers a client might send instead of raw PCM.
CONTAINERS = {b"\x1a\x45\xdf\xa3": "WebM/Matroska", b"OggS": "Ogg", b"RIFF": "WAV", b"fLaC": "FLAC", b"ID3": "MP3"}

#: Queues a saved session's recording as a job (TranscriptionService.submit).
Submit = Callable[[str, Submission], JobView]


@dataclass(frozen=True)
class LiveRequest:
    """What a live session asked for, and for whom."""

    owner: str | None
    client: str | None
    language: str | None = None
    task: Task = Task.TRANSCRIBE
    save: bool = False  # the session's audio becomes a job whose transcript downloads in every format
    commit_on_pause: bool = True  # a pause ends an utterance (OpenAI's server VAD); else only commit() does


class LiveSessions:
    """The live sessions of this process: at most `size` at once, all told to end when the service stops."""

    def __init__(self, engine: Engine, size: int, upload_dir: Path, submit: Submit) -> None:
        self._engine = engine
        self._slots = RequestSlots(size, "live sessions")
        self._upload_dir = upload_dir
        self._submit = submit
        self._stopping = threading.Event()

    def open(self, request: LiveRequest) -> LiveSession:
        """A new session; Busy past the bound, ShuttingDown once stopping, ModelLoading before the model is."""
        if self._stopping.is_set():
            raise ShuttingDown("the service is stopping")
        self._slots.take()
        try:
            stream = self.stream(request)
            recording = _Recording(self._upload_dir) if request.save else None
        except BaseException:
            self._slots.give()
            raise
        return LiveSession(stream, request, recording, self)

    def stream(self, request: LiveRequest) -> LiveStream:
        """A fresh stream for what `request` asks."""
        return self._engine.open_stream(request.language, request.task, commit_on_pause=request.commit_on_pause)

    def stop(self) -> None:
        """Ask every session to end (each finishes its text and closes within a receive timeout)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """Whether sessions should end now."""
        return self._stopping.is_set()

    def _closed(self, session: LiveSession) -> JobView | None:
        """A session ended: its slot back, its recording queued as a job if it asked."""
        self._slots.give()
        if session.recording is None:
            return None
        name = session.recording.finish()
        if name is None:  # no audio at all
            return None
        request = session.request
        options = TranscribeOptions(language=request.language, task=request.task)
        return self._submit(name, Submission("live-session.wav", options, request.owner, request.client))


class LiveSession:
    """One live session: PCM in, events out; close() exactly once."""

    def __init__(
        self, stream: LiveStream, request: LiveRequest, recording: _Recording | None, sessions: LiveSessions
    ) -> None:
        self._stream = stream
        self.request = request
        self.recording = recording
        self._sessions = sessions
        self._opened = time.monotonic()
        self._closed = False
        self._resamplers: dict[int, Resampler] = {}

    @property
    def seconds(self) -> float:
        """Audio heard so far."""
        return self._stream.seconds

    @property
    def stopping(self) -> bool:
        """The service is stopping: the session should finish its text and end."""
        return self._sessions.stopping

    def reconfigure(self, request: LiveRequest) -> None:
        """Take new settings (OpenAI's session.update) before any audio; InvalidOption once audio has come."""
        if self._stream.seconds:
            raise InvalidOption("session", "a session's settings are fixed once its audio has started")
        self._stream = self._sessions.stream(request)
        self.request = dataclasses.replace(request, save=self.request.save)

    def feed(self, data: bytes, rate: int = SAMPLE_RATE) -> list[LiveEvent]:
        """Hear a frame of 16-bit little-endian mono PCM at `rate`; InvalidAudio if it is something else."""
        samples = pcm_samples(data, rate)
        if rate != SAMPLE_RATE:
            samples = self._resamplers.setdefault(rate, Resampler(rate))(samples)
        if self._stream.seconds + len(samples) / SAMPLE_RATE > time.monotonic() - self._opened + AHEAD_S:
            raise InvalidAudio(f"audio arrives more than {AHEAD_S:.0f} s ahead of real time; send it as it is spoken")
        if self.recording is not None:
            self.recording.write(
                data if rate == SAMPLE_RATE else (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
            )
        return self._stream.feed(samples)

    def commit(self) -> list[LiveEvent]:
        """Make all the text heard so far final."""
        return self._stream.commit()

    def clear(self) -> None:
        """Drop the audio whose text is not final yet."""
        self._stream.clear()

    def close(self) -> JobView | None:
        """End the session (its slot is free at once): the job its recording became, if it asked to be saved."""
        if self._closed:
            return None
        self._closed = True
        return self._sessions._closed(self)


def pcm_samples(data: bytes, rate: int = SAMPLE_RATE) -> np.ndarray:
    """16-bit PCM as float samples; InvalidAudio for an odd length, a container, or bytes as loud as noise."""
    for magic, name in CONTAINERS.items():
        if data.startswith(magic):
            raise InvalidAudio(f"this is {name} data: send raw 16 kHz 16-bit little-endian mono PCM")
    if len(data) % 2:
        raise InvalidAudio("16-bit PCM frames have an even number of bytes")
    samples = np.frombuffer(data, "<i2").astype(np.float32) / 32768
    if len(samples) >= rate // 20 and float(np.abs(samples).mean()) > NOISE_LEVEL:
        correlation = float(np.dot(samples[1:], samples[:-1]) / max(float(np.dot(samples, samples)), 1e-9))
        if abs(correlation) < NOISE_CORRELATION:
            raise InvalidAudio("this frame sounds like random bytes: send raw 16 kHz 16-bit little-endian mono PCM")
    return samples


class _Recording:
    """A saved session's audio, written to UPLOAD_DIR as it arrives (never held in memory) as a WAV file."""

    def __init__(self, upload_dir: Path) -> None:
        self._upload_dir = upload_dir
        # Named as an incoming file until it is complete: the sweep removes one a killed process left.
        self._path = upload_dir / f"{INCOMING_PREFIX}{uuid.uuid4().hex}.wav"
        create_private(self._path)
        self._wave = wave.open(str(self._path), "wb")  # noqa: SIM115 (closed by finish)
        self._wave.setnchannels(1)
        self._wave.setsampwidth(2)
        self._wave.setframerate(SAMPLE_RATE)
        self._frames = 0

    def write(self, data: bytes) -> None:
        """Append PCM frames."""
        self._wave.writeframesraw(data)
        self._frames += len(data) // 2

    def finish(self) -> str | None:
        """Close the file under a server-made upload name and return it; None (and no file) if it holds no audio."""
        self._wave.close()
        if not self._frames:
            self._path.unlink(missing_ok=True)
            return None
        name = f"{uuid.uuid4().hex}.upload"
        os.rename(self._path, self._upload_dir / name)
        return name
