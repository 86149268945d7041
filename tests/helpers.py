"""Helpers shared by the tests: speech fixtures, a fake engine, uploads and polling, browser tabs.

Uploading and polling work alike on Flask's test client and on a LiveClient (real gunicorn or
nginx on loopback), so every test waits for jobs the same way.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import math
import shutil
import subprocess
import threading
import time
import uuid
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

import numpy as np
import pytest
import torch
import whisper
from flask import Flask
from flask.testing import FlaskClient
from playwright.sync_api import Browser, Page
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.servers import FIXTURES
from whisper_flask.access.keys import KeyStore
from whisper_flask.audio.media import DecodedAudio, MediaDecoder
from whisper_flask.engine.agreement import Word
from whisper_flask.engine.batching import ModelThread, Projection
from whisper_flask.engine.live import LiveEventKind, LiveStream
from whisper_flask.engine.live_window import Hypothesis
from whisper_flask.engine.options import Task, TranscribeOptions
from whisper_flask.engine.quantize import onednn_bf16
from whisper_flask.engine.speakers import Diarization, Turn
from whisper_flask.engine.windows import Window
from whisper_flask.exceptions import ModelLoading
from whisper_flask.extension import get_service
from whisper_flask.jobs.database import open_engine
from whisper_flask.jobs.store import SqlJobStore
from whisper_flask.settings import Settings

T = TypeVar("T")

#: Words each espeak-ng fixture says that tiny.en reliably hears.
SPOKEN = {
    "fox.wav": ["lazy dog", "river bank"],
    "report.wav": ["quarterly report", "Friday afternoon"],
    "train.wav": ["train", "tomorrow morning"],
    "garden.wav": ["yellow flowers", "garden"],
}
TERMINAL = ("completed", "failed", "cancelled")
#: oneDNN's bf16 kernels run only on CPUs with AVX512-BW/VL/DQ or AVX-NE-CONVERT (quantize.onednn_bf16).
needs_bf16_kernels = pytest.mark.skipif(not onednn_bf16(), reason="this CPU has no bf16 matrix kernels")


class Gate:
    """Holds the fake engine's windows while closed; a test opens it, or lets one window through."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._open = True
        self._passes = 0

    def set(self) -> None:
        """Open: every window goes through."""
        with self._changed:
            self._open = True
            self._changed.notify_all()

    def clear(self) -> None:
        """Close: windows wait at the gate."""
        with self._changed:
            self._open = False

    def let_one_through(self) -> None:
        """Let exactly one window pass a closed gate, whether it waits there already or comes later."""
        with self._changed:
            self._passes += 1
            self._changed.notify_all()

    def wait(self, timeout: float) -> bool:
        """Pass the gate within `timeout` s; whether it was passed."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._open or self._passes > 0, timeout):
                return False
            if not self._open:
                self._passes -= 1
            return True


class FakeEngine:
    """Stands in for Whisper in unit tests: one segment per 30-second window.

    Tests close `gate` to hold jobs inside a window and watch `in_window`, set once the window has
    passed its check and waits at the gate.
    """

    def __init__(self, multilingual: bool = True) -> None:
        self.model_name = "fake"
        self.error: str | None = None
        self.is_multilingual = multilingual
        self.loaded = False
        self.gate = Gate()
        self.in_window = threading.Event()
        self.steps = False  # a window held at the gate still takes decoder steps (calls its check), as a real one
        self.options: list[TranscribeOptions] = []
        self.resumed_from: list[Window | None] = []
        self.diarizations = 0  # diarize() calls begun
        self.speaker_gate = Gate()  # holds diarize() while closed, as `gate` holds windows
        self.live_gate = Gate()  # holds live decodes while closed, as a busy model thread would
        self.in_live_decode = threading.Event()
        self.in_diarization = threading.Event()

    @property
    def ready(self) -> bool:
        return self.loaded

    def start(self, settings: Settings) -> None:
        self.loaded = True

    def stop(self) -> None:
        self.loaded = False

    def transcribe(
        self,
        audio: DecodedAudio,
        options: TranscribeOptions,
        on_window: Callable[[Window], None],
        resume: Window | None = None,
        check: Callable[[], None] = lambda: None,
    ) -> dict[str, Any]:
        self.options.append(options)
        self.resumed_from.append(resume)
        duration = audio.duration
        segments = list(resume.segments) if resume else []
        for index in range(len(segments), math.ceil(duration / 30)):
            on_window(Window(index * 3000, list(segments), [], "en"))
            check()  # as before each decoder step of a real window
            self.in_window.set()
            held = time.monotonic() + 30
            while not self.gate.wait(0.05 if self.steps else 30):
                assert self.steps and time.monotonic() < held, "test left the gate closed"
                check()  # a decoder step of the held window
            if options.initial_prompt == "crash":
                raise RuntimeError("the fake engine was asked to crash")
            end = min(duration, (index + 1) * 30.0)
            segments.append({"id": index, "seek": index * 3000, "start": index * 30.0, "end": end,
                             "text": f" window {index}", "tokens": [50364 + index], "temperature": 0.0,
                             "avg_logprob": -0.2, "compression_ratio": 1.0, "no_speech_prob": 0.01})  # fmt: skip
        text = "".join(segment["text"] for segment in segments)
        return {"text": text, "segments": segments, "language": options.language or "en"}

    def diarize(
        self, audio: DecodedAudio, options: TranscribeOptions, check: Callable[[], None], on_progress: Any
    ) -> Diarization:
        """Two speakers taking turns every 30 s window."""
        self.diarizations += 1
        on_progress(0.5)
        self.in_diarization.set()
        while not self.speaker_gate.wait(0.05):
            check()  # as between real embedding batches: a cancel or a stop ends it here
        check()
        turns = tuple(Turn(start, min(start + 30.0, audio.duration), (index % 2))
                      for index, start in enumerate(range(0, math.ceil(audio.duration), 30)))  # fmt: skip
        return Diarization(turns, ((1.0, 0.0), (0.0, 1.0))[: len(turns)])

    def voiceprint(self, audio: DecodedAudio, check: Callable[[], None]) -> tuple[float, ...] | None:
        return (0.0, 1.0)

    def arithmetic(self) -> dict[str, str]:
        return {"encoder": "none", "decoder": "none", "live_encoder": "none"} if self.loaded else {}

    def detect_language(self, audio: DecodedAudio) -> dict[str, float]:
        if not self.loaded:  # as WhisperEngine: it answers at once, it does not wait for the model
            raise ModelLoading("model fake is loading")
        return {"de": 0.9, "en": 0.1}

    def open_stream(self, language: str | None, task: Task, *, commit_on_pause: bool) -> LiveStream:
        """A real LiveStream whose decodes read a word per loud half second and whose detector hears loudness."""
        if not self.loaded:
            raise ModelLoading("model fake is loading")
        return LiveStream(self._live_decode, loudness, commit_on_pause=commit_on_pause)

    def _live_decode(self, audio: np.ndarray, prompt: str) -> Hypothesis:
        self.in_live_decode.set()
        assert self.live_gate.wait(30), "test left the live gate closed"
        return _loud_words(audio, prompt)


def loudness(frame: torch.Tensor, rate: int) -> float:
    """The fake speech detector: speech wherever the frame is louder than a whisper."""
    return 1.0 if float(frame.abs().mean()) > 0.01 else 0.0


def _loud_words(audio: np.ndarray, prompt: str) -> Hypothesis:
    """The fake live decode: a word `w<second>` for each loud half second of the buffer."""
    words = tuple(
        Word(f" w{index / 2:g}", index / 2, index / 2 + 0.5)
        for index in range(len(audio) // 8000)
        if float(np.abs(audio[index * 8000 : (index + 1) * 8000]).mean()) > 0.01
    )
    return Hypothesis(words, ())


def create_key(tmp_path: Path, name: str, *, admin: bool = False) -> str:
    """A new key in the job database of an app or server whose TRANSCRIPT_DIR is tmp_path/transcripts."""
    (tmp_path / "transcripts").mkdir(exist_ok=True)
    keys = KeyStore(open_engine(tmp_path / "transcripts" / "jobs.sqlite3"))
    try:
        return keys.create(name, admin=admin)
    finally:
        keys.close()


def sqlite_store(path: Path) -> SqlJobStore:
    """A job store on the SQLite file at `path`, migrated as the service opens it."""
    return SqlJobStore(open_engine(path))


def base_config(tmp_path: Path) -> dict[str, Any]:
    """Settings that keep an app's files in tmp_path and never download."""
    return {
        "TESTING": True,
        "MODEL": "tiny.en",
        "MODEL_DOWNLOAD": False,
        "MODEL_DIR": tmp_path / "models",
        "UPLOAD_DIR": tmp_path / "uploads",
        "TRANSCRIPT_DIR": tmp_path / "transcripts",
        "LOG_DIR": tmp_path / "logs",
    }


# -- audio ------------------------------------------------------------------------------------


def wav_bytes(seconds: float, amplitude: float = 0.1) -> bytes:
    """A 16 kHz mono WAV of a 440 Hz tone (or silence with amplitude 0)."""
    t = np.arange(int(seconds * 16000)) / 16000
    buffer = io.BytesIO()
    write_wav(buffer, (amplitude * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16))
    return buffer.getvalue()


def write_wav(target: Path | IO[bytes], samples: np.ndarray) -> None:
    """Write int16 samples as a 16 kHz mono WAV."""
    with wave.open(str(target) if isinstance(target, Path) else target, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(samples.tobytes())


def speech(path: Path, seconds: float, names: list[str]) -> Path:
    """A WAV of about `seconds` made of the named fixtures in turn, a second of pause between."""
    chunks, total = [], 0
    pause = np.zeros(16000, np.int16)
    while total < seconds * 16000:
        for name in names:
            with wave.open(str(FIXTURES / name)) as source:
                chunks += [np.frombuffer(source.readframes(source.getnframes()), np.int16), pause]
            total += len(chunks[-2]) + len(pause)
    write_wav(path, np.concatenate(chunks)[: int(seconds * 16000)])
    return path


def quiet_between(path: Path, quiet_s: float) -> Path:
    """A WAV: real speech (lj001-0001.flac, 9.7 s), `quiet_s` of faint noise (-60 dBFS), the speech again."""
    with MediaDecoder(path.parent, 60).decode(FIXTURES / "lj001-0001.flac") as decoded:
        spoken = decoded.read(0, decoded.samples)
    write_wav(path, np.concatenate([spoken, noise(quiet_s), spoken]))
    return path


def noise(seconds: float, dbfs: float = -60) -> np.ndarray:
    """Int16 samples of white noise at `dbfs` (-60: a quiet room), the same on every call."""
    return np.random.default_rng(0).normal(0, 32768 * 10 ** (dbfs / 20), int(seconds * 16000)).astype(np.int16)


# -- a client for real servers, shaped like Flask's test client -------------------------------


class Response(Protocol):
    """What the helpers read from a response, Flask's or a LiveClient's."""

    status_code: int

    def get_json(self) -> Any: ...

    def get_data(self, as_text: bool = False) -> Any: ...


class Client(Protocol):
    """Flask's test client or a LiveClient."""

    def get(self, path: str) -> Any: ...

    def post(self, path: str, data: dict[str, Any]) -> Any: ...

    def delete(self, path: str) -> Any: ...


class LiveResponse:
    """A real server's answer, read whole."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code, self.headers, self.data = status, headers, body

    def get_json(self) -> Any:
        return json.loads(self.data)

    def get_data(self, as_text: bool = False) -> Any:
        return self.data.decode() if as_text else self.data


def keyed_client_class(key: str) -> type[FlaskClient]:
    """A Flask test client class that sends `key` as a Bearer token on every request."""

    class KeyedClient(FlaskClient):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"

    return KeyedClient


def client_with_key(app: Flask, key: str | None, **environ: str) -> FlaskClient:
    """A test client of `app` that sends `key` as a Bearer token (none if None), with extra WSGI environ entries.

    The app's own test_client() is unchanged: it still sends the key its start made.
    """
    client = app.test_client()
    if key is None:
        client.environ_base.pop("HTTP_AUTHORIZATION", None)
    else:
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    client.environ_base.update(environ)
    return client


def keyed(app: Flask, name: str, *, admin: bool = False, **environ: str) -> FlaskClient:
    """A test client of a started `app` acting as a new key `name`, made through the service as the CLI makes it."""
    return client_with_key(app, get_service(app).create_key(name, admin=admin), **environ)


class LiveClient:
    """HTTP/1.1 to a server on loopback, one connection per request; multipart like Flask's test client."""

    def __init__(self, port: int, key: str | None = None) -> None:
        self.port = port
        self.key = key

    def open(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = dict(headers or {})
        if self.key:
            headers.setdefault("Authorization", f"Bearer {self.key}")
        try:
            connection.request(method, path, body, headers)
            response = connection.getresponse()
            return LiveResponse(response.status, dict(response.getheaders()), response.read())
        finally:
            connection.close()

    def get(self, path: str) -> LiveResponse:
        return self.open("GET", path)

    def delete(self, path: str) -> LiveResponse:
        return self.open("DELETE", path)

    def post(self, path: str, data: dict[str, Any]) -> LiveResponse:
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in data.items():
            if isinstance(value, tuple):
                stream, filename = value
                head = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                head += "Content-Type: application/octet-stream\r\n"
                content = stream.read()
            else:
                head, content = f'Content-Disposition: form-data; name="{name}"\r\n', str(value).encode()
            parts.append(f"--{boundary}\r\n{head}\r\n".encode() + content + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.open("POST", path, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


# -- jobs ------------------------------------------------------------------------------------


def upload(client: Client, audio: Path | bytes | None = None, filename: str | None = None, **fields: str) -> Any:
    """POST /upload with the audio (a file, bytes, or 5 s of tone) and form fields; the response."""
    if isinstance(audio, Path):
        data, name = audio.read_bytes(), filename or audio.name
    else:
        data, name = (wav_bytes(5) if audio is None else audio), filename or "talk.wav"
    return client.post("/upload", data={"file": (io.BytesIO(data), name), **fields})


def submit(client: Client, audio: Path | bytes | None = None, **fields: str) -> str:
    """Upload and return the new job's id (the upload must be accepted)."""
    response = upload(client, audio, **fields)
    assert response.status_code == 202, response.get_json()
    return str(response.get_json()["transcription_id"])


def wait_until(client: Client, job_id: str, check: Callable[[dict[str, Any]], bool], timeout: float = 180) -> Any:
    """Poll GET /jobs/<id> until check(record) holds; return that record."""
    deadline = time.monotonic() + timeout
    while True:
        record = client.get(f"/jobs/{job_id}").get_json()
        if check(record):
            return record
        assert time.monotonic() < deadline, f"job {job_id} never reached the state: {record}"
        time.sleep(0.05)


def wait_for(client: Client, job_id: str, *statuses: str, timeout: float = 180) -> Any:
    """Poll until the job reaches one of `statuses` (any final one if none are named); return its record."""
    wanted = statuses or TERMINAL
    return wait_until(client, job_id, lambda record: record["status"] in wanted, timeout)


def transcribing(record: dict[str, Any]) -> bool:
    """The job is transcribing, past its first window."""
    return record["status"] == "in_progress" and record["processed_seconds"] > 0


def transcripts(client: Client, job_id: str) -> dict[str, bytes]:
    """Every format of a job's transcript (those its /progress links to)."""
    formats = client.get(f"/progress/{job_id}").get_json()["formats"]
    return {fmt: client.get(f"/download/{job_id}.{fmt}").get_data() for fmt in formats}


#: Decoder scores in the JSON transcript: batched matmuls round differently from one window alone.
SCORES = ("avg_logprob", "no_speech_prob")


def split_scores(transcript: bytes) -> tuple[dict[str, Any], list[float]]:
    """The JSON transcript without the decoder's scores, and the scores."""
    result = json.loads(transcript)
    scores = [segment.pop(name) for segment in result["segments"] for name in SCORES]
    return result, scores


def assert_same_json_transcript(got: bytes, expected: bytes) -> None:
    """Two fp32 JSON transcripts agree: text, tokens and times exactly, the decoder's scores to 1e-4.

    Windows that shared decoder steps with different neighbours round their matmuls differently
    (measured: the scores move in the 6th or 7th significant digit; text, tokens and times do not).
    """
    (got_json, got_scores), (expected_json, expected_scores) = split_scores(got), split_scores(expected)
    assert got_json == expected_json
    assert got_scores == pytest.approx(expected_scores, rel=1e-4, abs=1e-6)


def worker_pid(arbiter: int) -> int:
    """The gunicorn worker process of an arbiter (the process the model and jobs live in)."""
    children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == arbiter]
    assert len(children) == 1, children
    return children[0]


def _ppid(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def eventually(condition: Callable[[], bool], timeout: float = 60, message: str = "the condition never held") -> None:
    """Wait until condition() holds; fail the test with `message` if it does not within timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{message} (waited {timeout} s)"
        time.sleep(0.05)


def windows_per_step(caplog: pytest.LogCaptureFixture) -> list[int]:
    """For each window decoded, the most windows that shared one of its steps (the decoding log)."""
    messages = [record.getMessage() for record in caplog.records]
    return [int(message.split()[-4]) for message in messages if message.endswith("windows per step")]


# -- live sessions -----------------------------------------------------------------------------


def done_within(seconds: float, call: Callable[[], T]) -> T:
    """call()'s result, run on a thread of its own (a daemon: one that hangs fails the test, not the run)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as exc:  # re-raised on the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"not done within {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]  # type: ignore[no-any-return]


def stream_final_text(stream: LiveStream, audio: np.ndarray) -> str:
    """The final text of a stream fed 16 kHz audio 100 ms at a time (as a session that keeps up hears it), then
    committed as a client's end would."""
    events = [event for start in range(0, len(audio), 1600) for event in stream.feed(audio[start : start + 1600])]
    return "".join(event.text for event in events + stream.commit() if event.kind is LiveEventKind.FINAL)


def start_model_thread(model: whisper.Whisper, project: Projection, size: int = 8) -> ModelThread:
    """A model thread started on the model, stopped by whoever asked for it."""
    thread = ModelThread(size, wait_s=0.05)
    thread.start(model, project)
    return thread


def tone(seconds: float, amplitude: float = 0.25) -> bytes:
    """16 kHz 16-bit PCM of a tone: speech to the fake engine's detector."""
    samples = amplitude * np.sin(2 * np.pi * 220 * np.arange(int(seconds * 16000)) / 16000)
    return (samples * 32767).astype("<i2").tobytes()


def silence(seconds: float) -> bytes:
    """16 kHz 16-bit PCM of silence."""
    return bytes(2 * int(seconds * 16000))


def pcm_of(path: Path, rate: int = 16000) -> bytes:
    """A recording as 16-bit mono PCM at `rate`."""
    command = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "s16le", "-ac", "1", "-ar", str(rate), "-"]
    return subprocess.run(command, capture_output=True, check=True).stdout


def webm_of(pcm: bytes) -> bytes:
    """16 kHz 16-bit PCM as a browser's MediaRecorder would send it: WebM with Opus at 48 kHz."""
    command = ["ffmpeg", "-nostdin", "-v", "error", "-f", "s16le", "-ar", "16000", "-ac", "1", "-i", "-"]
    command += ["-ar", "48000", "-c:a", "libopus", "-f", "webm", "-"]
    return subprocess.run(command, input=pcm, capture_output=True, check=True).stdout


class Served:
    """An app on the fake engine behind werkzeug's server on loopback (conftest's `serve`), and a key for it."""

    def __init__(self, app: Flask, port: int) -> None:
        self.app = app
        self.port = port
        self.key = get_service(app).create_key("speaker", admin=False)

    def connect(self, path: str = "/ws/transcribe", key: str | None = "", **options: Any) -> ClientConnection:
        """A WebSocket to `path` with this key (or `key`; None sends none)."""
        key = self.key if key == "" else key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return connect(f"ws://127.0.0.1:{self.port}{path}", additional_headers=headers, open_timeout=10, **options)


def admits(served: Served) -> bool:
    """Whether a live session can be opened now (the handshake is not refused)."""
    try:
        with served.connect():
            return True
    except InvalidStatus:
        return False


def refusal(served: Served, path: str = "/ws/transcribe", **options: Any) -> tuple[int, dict[str, Any]]:
    """The status and JSON body with which the handshake is refused."""
    with pytest.raises(InvalidStatus) as refused:
        served.connect(path, **options).close()
    return refused.value.response.status_code, json.loads(refused.value.response.body)


def send_stream_paced(ws: ClientConnection, stream: bytes, seconds: float, frame_s: float = 0.1) -> None:
    """Send an encoded stream of `seconds` of audio in equal pieces, one every `frame_s`, as a recorder would."""
    pieces = max(1, round(seconds / frame_s))
    size = -(-len(stream) // pieces)
    started = time.monotonic()
    for index in range(pieces):
        time.sleep(max(0.0, started + index * frame_s - time.monotonic()))
        ws.send(stream[index * size : (index + 1) * size])


def send_paced(ws: ClientConnection, pcm: bytes, frame_s: float = 0.1, rate: int = 16000) -> None:
    """Send PCM in frames of `frame_s`, each when its audio would have been spoken."""
    step = int(rate * frame_s) * 2
    started = time.monotonic()
    for index in range(0, len(pcm), step):
        time.sleep(max(0.0, started + index / (2 * rate) - time.monotonic()))
        ws.send(pcm[index : index + step])


def received(ws: ClientConnection, timeout: float = 60) -> tuple[list[dict[str, Any]], int | None]:
    """Every message until the server closes the socket (within `timeout`), and its close code."""
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            messages.append(json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic()))))
    except ConnectionClosed as closed:
        return messages, closed.rcvd.code if closed.rcvd else None


def final_text(messages: list[dict[str, Any]]) -> str:
    """The final text of a /ws/transcribe session's messages, joined."""
    return "".join(message["text"] for message in messages if message["type"] == "final")


# -- browsers --------------------------------------------------------------------------------


def chromium() -> str:
    """Debian's Chromium (Ubuntu's snap), which Playwright drives through its executable path: no browser download."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    assert executable, "chromium is missing: deploy/system-packages.sh installs it"
    return executable


@contextlib.contextmanager
def watched_page(browser: Browser) -> Iterator[Page]:
    """A new tab of `browser` as the `page` fixture gives it: after the block, what went wrong fails the test."""
    context = browser.new_context(permissions=["clipboard-read", "clipboard-write"], accept_downloads=True)
    tab = context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    tab.on("console", lambda note: problems.append(note.text) if "Content Security Policy" in note.text else None)
    tab.on("dialog", lambda dialog: problems.append(f"a dialog opened: {dialog.message}"))
    # Nothing may come from another host (a CDN): every asset is served by the service itself.
    local = ("http://127.0.0.1:", "data:", "blob:")
    tab.on("request", lambda sent: None if sent.url.startswith(local) else problems.append(f"fetched {sent.url}"))
    yield tab
    context.close()
    assert not problems, problems
