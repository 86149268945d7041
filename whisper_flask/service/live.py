"""Live sessions: bounded in number, their audio checked, ended by the service's stop, saved as jobs on request.

A session holds an HTTP thread for as long as it lasts, so at most MAX_LIVE_SESSIONS run at once and
more are refused with Busy (slots.py). Its text comes from a LiveStream (engine/live.py) on the shared
model; its audio is 16 kHz 16-bit mono PCM, checked before the stream hears it (ARCHITECTURE.md,
"Live transcription").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import struct
import threading
import time
import uuid
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from whisper_flask.audio.resample import Resampler
from whisper_flask.audio.stream_decode import LiveAudioFormat, WebmDecoder
from whisper_flask.engine.engine import Engine
from whisper_flask.engine.live import LiveEvent, LiveStream
from whisper_flask.engine.options import Task, TranscribeOptions
from whisper_flask.exceptions import InvalidAudio, InvalidOption, ServiceError, ShuttingDown
from whisper_flask.files import atomic_write, create_private
from whisper_flask.jobs.records import JobView, Submission
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

#: A saved session's recording (.wav) and the request it was saved for (.json), named apart from partial uploads so
#: that their sweep leaves them: a process killed mid-session leaves both, and the next start queues the recording.
RECORDING_PREFIX = ".live-"
#: The wave module's header of a PCM file: the RIFF, fmt and data chunks' headers, each size where it is written.
WAV_HEADER, RIFF_SIZE_AT, DATA_AT = 44, 4, 36
_RECORDING_ID = re.compile(r"[0-9a-f]{32}")

#: Queues a saved session's recording (an upload name) as the job with this id, or answers with that job if it is
#: queued already (TranscriptionService.submit with job_id).
Submit = Callable[[str, Submission, str], JobView]


@dataclass(frozen=True)
class LiveRequest:
    """What a live session asked for, and for whom."""

    owner: str | None
    client: str | None
    language: str | None = None
    task: Task = Task.TRANSCRIBE
    save: bool = False  # the session's audio becomes a job whose transcript downloads in every format
    commit_on_pause: bool = True  # a pause ends an utterance (OpenAI's server VAD); else only commit() does
    audio: LiveAudioFormat = LiveAudioFormat.PCM16  # what the client's binary frames hold


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
            recording = _Recording(self._upload_dir, request) if request.save else None
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

    def recover(self) -> None:
        """Queue the recordings of saved sessions that a killed process left, each as the job its session would
        have become (once: the job's id is the recording's); one that cannot be queued now (a full queue) is kept
        for the next start."""
        for request_path in sorted(self._upload_dir.glob(f"{RECORDING_PREFIX}*.json")):
            recording = _Recording.found(request_path)
            try:
                if not _RECORDING_ID.fullmatch(recording.id):
                    raise ValueError("not a recording's name")
                request = _stored_request(request_path)
                frames = _mend_header(recording.path)
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("removed a saved live session's recording that could not be read")
                frames = 0
            if frames:
                try:
                    job = self._queue(recording, request)
                except ServiceError as error:
                    log.warning("kept a saved live session's recording for the next start (%s)", error.code)
                    continue
                log.info("job %s is the recording of a saved live session that a stopped process left", job.job.id)
            recording.remove()

    def _closed(self, session: LiveSession) -> JobView | None:
        """A session ended: its slot back, its recording queued as a job if it asked."""
        self._slots.give()
        recording = session.recording
        if recording is None:
            return None
        # Removed only once queued: a process killed in between leaves it for recover(), which finds its job.
        job = self._queue(recording, session.request) if recording.finish() else None  # None: no audio at all
        recording.remove()
        return job

    def _queue(self, recording: _Recording, request: LiveRequest) -> JobView:
        options = TranscribeOptions(language=request.language, task=request.task)
        upload_name = f"{uuid.uuid4().hex}.upload"
        os.link(recording.path, self._upload_dir / upload_name)  # the job owns this name; the recording stays
        submission = Submission("live-session.wav", options, request.owner, request.client)
        return self._submit(upload_name, submission, recording.id)


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
        self._webm = WebmDecoder() if request.audio is LiveAudioFormat.WEBM else None  # stopped by close()

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
        if self.recording is not None:
            self.recording.describe(self.request)

    def feed(self, data: bytes, rate: int = SAMPLE_RATE) -> list[LiveEvent]:
        """Hear a frame of 16-bit little-endian mono PCM at `rate` (or of the session's WebM stream); InvalidAudio
        if it is something else."""
        if self._webm is not None:
            return self._hear(self._webm.write(data))
        pcm_samples(data, rate)  # checked as the client sent it
        return self._hear(data, rate)

    def _hear(self, data: bytes, rate: int = SAMPLE_RATE) -> list[LiveEvent]:
        samples = np.frombuffer(data, "<i2").astype(np.float32) / 32768
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
        """Make all the text heard so far final (a WebM stream's last frames decoded first: no audio may follow)."""
        events: list[LiveEvent] = []
        if self._webm is not None:
            events = self._hear(self._webm.finish())
        return events + self._stream.commit()

    def clear(self) -> None:
        """Drop the audio whose text is not final yet."""
        self._stream.clear()

    def close(self) -> JobView | None:
        """End the session (its slot is free at once): the job its recording became, if it asked to be saved."""
        if self._closed:
            return None
        self._closed = True
        if self._webm is not None:
            self._webm.stop()
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
    """A saved session's audio, written to UPLOAD_DIR as it arrives (never held in memory) as a WAV file, beside
    the request it is saved for (LiveSessions.recover queues what a killed process left); its id is its job's."""

    def __init__(self, upload_dir: Path, request: LiveRequest | None = None, recording_id: str | None = None) -> None:
        self.id = recording_id or uuid.uuid4().hex
        stem = upload_dir / f"{RECORDING_PREFIX}{self.id}"
        self.path, self._request_path = stem.with_suffix(".wav"), stem.with_suffix(".json")
        self._frames = 0
        if request is None:  # found on disk (found())
            return
        self.describe(request)
        create_private(self.path)
        # Unbuffered: what a killed process had received is on disk, not in its memory.
        self._file = self.path.open("wb", buffering=0)
        self._wave = wave.open(self._file, "wb")  # noqa: SIM115 (closed by finish)
        self._wave.setnchannels(1)
        self._wave.setsampwidth(2)
        self._wave.setframerate(SAMPLE_RATE)

    @classmethod
    def found(cls, request_path: Path) -> _Recording:
        """The recording whose request is at `request_path` (left by a killed process)."""
        return cls(request_path.parent, recording_id=request_path.stem[len(RECORDING_PREFIX) :])

    def describe(self, request: LiveRequest) -> None:
        """Store the request the recording is saved for (the job it becomes is the request's)."""
        fields = {"owner": request.owner, "client": request.client, "language": request.language}
        with atomic_write(self._request_path) as file:
            json.dump({**fields, "task": request.task.value}, file)

    def write(self, data: bytes) -> None:
        """Append PCM frames."""
        self._wave.writeframesraw(data)
        self._frames += len(data) // 2

    def finish(self) -> bool:
        """Close the file (its header written); whether it holds any audio."""
        self._wave.close()
        self._file.close()
        return self._frames > 0

    def remove(self) -> None:
        """Delete the recording and its request (its job, if any, has its own link to the audio)."""
        self.path.unlink(missing_ok=True)
        self._request_path.unlink(missing_ok=True)


def _stored_request(path: Path) -> LiveRequest:
    """The request a recording was saved for (_Recording.describe)."""
    fields = json.loads(path.read_text())
    return LiveRequest(fields["owner"], fields["client"], fields["language"], Task(fields["task"]), save=True)


def _mend_header(path: Path) -> int:
    """Write a WAV file's sizes from its length (a killed process never wrote them); its frames (0: no audio)."""
    with path.open("r+b") as file:
        header = file.read(WAV_HEADER)
        if len(header) < WAV_HEADER:
            return 0
        if header[:4] != b"RIFF" or header[DATA_AT : DATA_AT + 4] != b"data":
            raise ValueError("not the wave module's PCM header")
        data = (os.fstat(file.fileno()).st_size - WAV_HEADER) // 2 * 2
        file.truncate(WAV_HEADER + data)
        file.seek(RIFF_SIZE_AT)
        file.write(struct.pack("<I", WAV_HEADER - 8 + data))
        file.seek(DATA_AT + 4)
        file.write(struct.pack("<I", data))
    return data // 2
