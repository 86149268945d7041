"""The inference engine: the only code that touches the shared Whisper model.

openai-whisper's model is not thread-safe: ``decode`` installs kv-cache forward
hooks on shared modules and word alignment installs cross-attention hooks, so
two overlapping calls corrupt each other. Each job therefore runs Whisper's own
``transcribe`` loop (temperature fallback, prompts, timestamps: not forked) on
a per-job proxy of the model. The proxy takes a FIFO turn on the model at the
start of every window's decode and keeps it until the next window, so all model
work of one window (decode, fallbacks, alignment) is exclusive, and jobs take
turns window by window: a short job waits at most one window of a long one.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
import whisper
from whisper.audio import FRAMES_PER_SECOND

from .checkpoints import ensure_checkpoint

log = logging.getLogger(__name__)

#: Called as each window starts, with the loop's state; it may raise to stop the job there.
WindowHook = Callable[["Window"], None]

_TRANSCRIBE_CODE = whisper.transcribe.__code__


class ModelUnavailable(RuntimeError):
    """The model failed to load or is still loading."""


class FairTurn:
    """Hands the model to one thread at a time, in the order they asked (FIFO)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: deque[int] = deque()
        self._holder: int | None = None

    def take(self) -> None:
        """Take the turn; a holder with others waiting goes to the back of the line first."""
        me = threading.get_ident()
        with self._cond:
            if self._holder == me:
                if not self._waiting:
                    return
                self._holder = None
                self._cond.notify_all()
            self._waiting.append(me)
            self._cond.wait_for(lambda: self._holder is None and self._waiting[0] == me)
            self._waiting.popleft()
            self._holder = me

    def hold(self) -> None:
        """Keep the turn if held (no hand-over), else take it."""
        if self._holder != threading.get_ident():
            self.take()

    def release(self) -> None:
        """Give the turn up if this thread holds it."""
        with self._cond:
            if self._holder == threading.get_ident():
                self._holder = None
                self._cond.notify_all()


@dataclass(frozen=True)
class Window:
    """Whisper's transcribe loop as a window starts: what progress and a resume need."""

    seek: int  # frames (1/100 s) of audio decoded so far
    segments: list[dict[str, Any]]  # the segments finished before this window
    prompt: list[int]  # the tokens this window is conditioned on
    language: str | None

    @property
    def seconds(self) -> float:
        """Seconds of audio decoded so far."""
        return self.seek / FRAMES_PER_SECOND


def _transcribe_loop() -> dict[str, Any]:
    """The local variables of the running ``whisper.transcribe`` (its seek and segments)."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        if frame.f_code is _TRANSCRIBE_CODE:
            return frame.f_locals
        frame = frame.f_back
    return {}


class _JobModel:
    """One job's view of the shared model: every model call goes through the turn."""

    def __init__(
        self, model: whisper.Whisper, turn: FairTurn, on_window: WindowHook, prompt_swap: tuple[list[int], list[int]]
    ) -> None:
        self._model = model
        self._turn = turn
        self._on_window = on_window
        self._canonical, self._exact = prompt_swap

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def decode(self, mel: torch.Tensor, options: whisper.DecodingOptions) -> Any:
        prompt = list(options.prompt or [])
        if self._canonical and prompt[: len(self._canonical)] == self._canonical:
            # A resumed job: its initial_prompt stands for the exact tokens (timestamps included)
            # that the interrupted run was conditioned on, until Whisper resets its prompt.
            prompt = self._exact + prompt[len(self._canonical) :]
            options = dataclasses.replace(options, prompt=prompt)
        loop = _transcribe_loop()
        window = Window(loop.get("seek", 0), list(loop.get("all_segments", [])), prompt, options.language)
        # Report and allow cancellation before waiting for the model, never while holding it.
        self._on_window(window)
        self._turn.take()
        # Temperature fallback samples from torch's global RNG; seeding it per window
        # makes a job's result independent of what other jobs drew before it.
        torch.manual_seed(window.seek)
        return self._model.decode(mel, options)

    def detect_language(self, mel: torch.Tensor, tokenizer: Any = None) -> Any:
        self._turn.take()
        return self._model.detect_language(mel, tokenizer)

    def __call__(self, mel: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # Word alignment: its hooks were installed while this window holds the turn.
        self._turn.hold()
        return self._model(mel, tokens)


class WhisperEngine:
    """Loads one Whisper model in the background and runs every job's model work through it."""

    def __init__(self) -> None:
        self._turn = FairTurn()
        self._ready = threading.Event()
        self._model: whisper.Whisper | None = None
        self.model_name = ""
        self.error: str | None = None

    def start(self, model: str, model_dir: Path, device: str, allow_download: bool) -> None:
        """Resolve and load the model on a background thread; /readyz turns 200 when done."""
        self.model_name = model
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        threading.Thread(
            target=self._load, args=(model, model_dir, device, allow_download), name="whisper-load", daemon=True
        ).start()

    def _load(self, model: str, model_dir: Path, device: str, allow_download: bool) -> None:
        try:
            path = ensure_checkpoint(model, model_dir, allow_download)
            loaded = whisper.load_model(str(path), device=device)
            if model in whisper._ALIGNMENT_HEADS:
                # load_model(path) cannot know the name, so it would use generic heads.
                loaded.set_alignment_heads(whisper._ALIGNMENT_HEADS[model])
            self._model = loaded
            log.info("model %s loaded on %s from %s", model, device, path)
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
        """Block until the model is loaded; raise ModelUnavailable if it failed or timed out."""
        self._ready.wait(timeout)
        if self._model is None:
            raise ModelUnavailable(self.error or f"model {self.model_name} is still loading")
        return self._model

    def transcribe(
        self, audio: np.ndarray, options: dict[str, Any], on_window: WindowHook, resume: Window | None = None
    ) -> dict[str, Any]:
        """Run Whisper's transcribe loop on audio, one window at a time between jobs.

        With `resume` (a Window an interrupted run reported), start there instead of at 0.
        """
        model = self.wait_until_ready()
        fp16 = model.device.type == "cuda"
        if resume is None:
            job_model = _JobModel(model, self._turn, on_window, ([], []))
            try:
                return whisper.transcribe(job_model, audio, verbose=None, fp16=fp16, **options)
            finally:
                self._turn.release()

        tokenizer = whisper.tokenizer.get_tokenizer(
            model.is_multilingual,
            num_languages=model.num_languages,
            language=resume.language,
            task=options.get("task", "transcribe"),
        )
        # transcribe() encodes initial_prompt as " " + text.strip(); the proxy swaps that back.
        text = tokenizer.decode(resume.prompt)
        canonical = tokenizer.encode(" " + text.strip()) if resume.prompt else []
        done = resume.segments

        def on_resumed_window(window: Window) -> None:
            on_window(dataclasses.replace(window, segments=done + _renumbered(window.segments, len(done))))

        job_model = _JobModel(model, self._turn, on_resumed_window, (canonical, resume.prompt))
        resumed = {
            **options,
            "clip_timestamps": str(resume.seconds),
            "language": resume.language,
            "initial_prompt": text if resume.prompt else None,
        }
        try:
            result = whisper.transcribe(job_model, audio, verbose=None, fp16=fp16, **resumed)
        finally:
            self._turn.release()
        segments = done + _renumbered(result["segments"], len(done))
        tokens = [token for segment in segments for token in segment["tokens"]]
        return {"text": tokenizer.decode(tokens), "segments": segments, "language": result["language"]}

    def detect_language(self, audio: np.ndarray) -> dict[str, float]:
        """Language probabilities for the first 30 seconds of audio."""
        model = self.wait_until_ready(timeout=0)
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio), model.dims.n_mels).to(model.device)
        self._turn.take()
        try:
            _, probs = model.detect_language(mel)
        finally:
            self._turn.release()
        return dict(probs)


def _renumbered(segments: list[dict[str, Any]], start: int) -> list[dict[str, Any]]:
    return [{**segment, "id": start + index} for index, segment in enumerate(segments)]
