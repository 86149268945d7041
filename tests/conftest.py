from __future__ import annotations

import math
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner

from tests.servers import free_port, start_gunicorn, stop
from whisper_flask import create_app
from whisper_flask.checkpoints import ensure_checkpoint
from whisper_flask.engine import Window
from whisper_flask.jobs import JobService

FIXTURES = Path(__file__).parent / "fixtures"
#: Words each espeak-ng fixture says that tiny.en reliably hears.
SPOKEN = {
    "fox.wav": ["lazy dog", "river bank"],
    "report.wav": ["quarterly report", "Friday afternoon"],
    "train.wav": ["train", "tomorrow morning"],
    "garden.wav": ["yellow flowers", "garden"],
}


class FakeEngine:
    """Stands in for Whisper in unit tests: one segment per 30-second window.

    Tests close `gate` to hold jobs inside a window and watch `in_window`.
    """

    def __init__(self, multilingual: bool = True) -> None:
        self.model_name = "fake"
        self.error: str | None = None
        self.is_multilingual = multilingual
        self.loaded = False
        self.gate = threading.Event()
        self.gate.set()
        self.in_window = threading.Event()
        self.options: list[dict[str, Any]] = []
        self.resumed_from: list[Window | None] = []

    @property
    def ready(self) -> bool:
        return self.loaded

    def start(self, config: Mapping[str, Any]) -> None:
        self.loaded = True

    def transcribe(
        self,
        audio: np.ndarray,
        options: dict[str, Any],
        on_window: Callable[[Window], None],
        resume: Window | None = None,
    ) -> dict:
        self.options.append(options)
        self.resumed_from.append(resume)
        duration = len(audio) / 16000
        segments = list(resume.segments) if resume else []
        for index in range(len(segments), math.ceil(duration / 30)):
            on_window(Window(index * 3000, list(segments), [], "en"))
            self.in_window.set()
            assert self.gate.wait(30), "test left the gate closed"
            if options.get("initial_prompt") == "crash":
                raise RuntimeError("the fake engine was asked to crash")
            end = min(duration, (index + 1) * 30.0)
            segments.append({"id": index, "start": index * 30.0, "end": end, "text": f" window {index}"})
        text = "".join(segment["text"] for segment in segments)
        return {"text": text, "segments": segments, "language": options.get("language", "en")}

    def detect_language(self, audio: np.ndarray) -> dict[str, float]:
        return {"de": 0.9, "en": 0.1}


def wav_bytes(seconds: float, amplitude: float = 0.1) -> bytes:
    """A 16 kHz mono WAV of a 440 Hz tone (or silence with amplitude 0)."""
    import io
    import wave

    t = np.arange(int(seconds * 16000)) / 16000
    samples = (amplitude * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(samples.tobytes())
    return buffer.getvalue()


def windows_per_step(caplog: pytest.LogCaptureFixture) -> list[int]:
    """For each window decoded, the most windows that shared one of its steps (the model thread's log)."""
    messages = [record.getMessage() for record in caplog.records]
    return [int(message.split()[-4]) for message in messages if message.endswith("windows per step")]


def wait_for(client: FlaskClient, job_id: str, *statuses: str, timeout: float = 60) -> dict[str, Any]:
    """Poll /progress until the job reaches one of statuses."""
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/progress/{job_id}").get_json()
        if body["status"] in statuses:
            return body
        assert time.monotonic() < deadline, f"job {job_id} stuck: {body}"
        time.sleep(0.05)


def base_config(tmp_path: Path) -> dict[str, Any]:
    return {
        "TESTING": True,
        "MODEL": "tiny.en",
        "MODEL_DOWNLOAD": False,
        "MODEL_DIR": tmp_path / "models",
        "UPLOAD_DIR": tmp_path / "uploads",
        "TRANSCRIPT_DIR": tmp_path / "transcripts",
        "LOG_DIR": tmp_path / "logs",
    }


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def make_app(tmp_path: Path, engine: FakeEngine) -> Iterator[Callable[..., Flask]]:
    """Build apps on the fake engine; each is shut down after the test."""
    apps: list[Flask] = []

    def make(**config: Any) -> Flask:
        app = create_app({**base_config(tmp_path), "ENGINE": engine, **config})
        apps.append(app)
        return app

    yield make
    engine.gate.set()
    for app in apps:
        service(app).shutdown()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runner(app: Flask) -> FlaskCliRunner:
    return app.test_cli_runner()


def service(app: Flask) -> JobService:
    return app.extensions["whisper_flask"]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MODEL_DIR holding tiny.en, converted once from its registry pack."""
    directory = tmp_path_factory.mktemp("models")
    ensure_checkpoint("tiny.en", directory, allow_download=False)
    return directory


@pytest.fixture
def make_real_app(tmp_path: Path, model_dir: Path) -> Iterator[Callable[..., Flask]]:
    """Build apps on the real tiny.en model, ready to serve."""
    apps: list[Flask] = []

    def make(**config: Any) -> Flask:
        app = create_app({**base_config(tmp_path), "MODEL_DIR": model_dir, **config})
        apps.append(app)
        service(app).engine.wait_until_ready(120)  # type: ignore[attr-defined]
        return app

    yield make
    for app in apps:
        service(app).shutdown()


#: Starts real gunicorn (again, after a stop) on the test's directories; returns its port and process.
StartGunicorn = Callable[..., tuple[int, "subprocess.Popen[bytes]"]]


@pytest.fixture
def gunicorn(tmp_path: Path, model_dir: Path) -> Iterator[StartGunicorn]:
    """Real gunicorn with deploy/gunicorn.conf.py and tiny.en; every start is stopped after the test."""
    port = free_port()
    processes: list[subprocess.Popen[bytes]] = []

    def start(**settings: str) -> tuple[int, subprocess.Popen[bytes]]:
        processes.append(start_gunicorn(tmp_path, model_dir, port, **settings))
        return port, processes[-1]

    yield start
    for process in processes:
        stop(process)
