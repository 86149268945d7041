"""The inference engine: the only code that touches the shared Whisper model.

openai-whisper's model is not thread-safe: ``decode`` installs kv-cache forward
hooks on shared modules and word alignment installs cross-attention hooks, so
two overlapping calls corrupt each other. Each job therefore runs Whisper's own
``transcribe`` loop (temperature fallback, prompts, timestamps: not forked) on a
per-job proxy of the model, and the proxy hands each window's ``decode`` to one
decoding thread:

- windows waiting from different jobs that can share a decode (same options but
  the prompt, greedy) run as one batch through Whisper's DecodingTask
  (``batching``); the batch closes when every running job has a window waiting,
  when it is full, or BATCH_WAIT_MS after its oldest window arrived;
- batches are taken oldest window first, so no job starves behind the others;
- a temperature fallback reuses its window's encoder output, and samples with a
  seed of its own window, so its transcript does not depend on the jobs beside it;
- language detection and word alignment take a FIFO turn on the model; the turn
  stays with its holder until it next decodes, so alignment (hooks installed
  around a forward pass) finishes before anyone else's model call.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import numpy as np
import torch
import whisper
from whisper.audio import FRAMES_PER_SECOND

from .batching import Projection, decode_windows, whisper_projection
from .checkpoints import ensure_checkpoint
from .quantize import INT8_MODELS, quantize_int8

log = logging.getLogger(__name__)

#: Called as each window starts, with the loop's state; it may raise to stop the job there.
WindowHook = Callable[["Window"], None]
#: A resumed job's (re-encoded initial_prompt, exact tokens it stands for); empty when fresh.
PromptSwap = tuple[list[int], list[int]]

_TRANSCRIBE_CODE = whisper.transcribe.__code__


class ModelUnavailable(RuntimeError):
    """The model failed to load or is still loading."""


class FairTurn:
    """Hands the model to one thread at a time, in the order they asked (FIFO)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: deque[int] = deque()
        self._holder: int | None = None

    def hold(self) -> None:
        """Take the turn unless this thread holds it already."""
        me = threading.get_ident()
        with self._cond:
            if self._holder == me:
                return
            self._waiting.append(me)
            self._cond.wait_for(lambda: self._holder is None and self._waiting[0] == me)
            self._waiting.popleft()
            self._holder = me

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
    """One job's view of the shared model: decodes go to the batcher, other model calls take the turn."""

    def __init__(
        self,
        model: whisper.Whisper,
        batcher: _Batcher,
        on_window: WindowHook,
        prompt_swap: PromptSwap,
        aligns: bool,
    ) -> None:
        self._model = model
        self._batcher = batcher
        self._on_window = on_window
        self._canonical, self._exact = prompt_swap
        self._aligns = aligns
        self._encoded: tuple[torch.Tensor, torch.Tensor] | None = None  # (mel, its encoder output)

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
        self._batcher.turn.release()
        self._on_window(window)
        # transcribe() passes the same mel tensor to each temperature of a fallback.
        encoded = self._encoded[1] if self._encoded is not None and self._encoded[0] is mel else None
        result = self._batcher.decode(_Request(mel if encoded is None else encoded, options, window.seek))
        self._encoded = (mel, result.audio_features)
        if self._aligns:
            # Word alignment follows: it flips a global SDPA switch and hooks shared modules
            # before its forward pass, so it must hold the model from now until its next decode.
            self._batcher.turn.hold()
        return result

    def detect_language(self, mel: torch.Tensor, tokenizer: Any = None) -> Any:
        self._batcher.turn.hold()
        return self._model.detect_language(mel, tokenizer)

    def __call__(self, mel: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        self._batcher.turn.hold()  # held since the decode; see there
        return self._model(mel, tokens)


@dataclass(eq=False)
class _Request:
    """One window waiting to be decoded, and then its result."""

    window: torch.Tensor  # the mel segment, or its encoder output from an earlier temperature
    options: whisper.DecodingOptions
    seed: int
    arrived: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None  # a DecodingResult, or the exception its batch raised

    @property
    def shares_batch(self) -> bool:
        """Greedy windows batch; sampling (seeded per window) and beam search decode alone."""
        return self.options.temperature == 0 and self.options.beam_size is None

    def batches_with(self, other: _Request) -> bool:
        """Whether both can be rows of one batch: the same options apart from the prompt."""
        return (
            self.shares_batch
            and other.shares_batch
            and dataclasses.replace(self.options, prompt=None) == dataclasses.replace(other.options, prompt=None)
        )


class _Batcher:
    """Collects the windows that jobs wait on and decodes them in batches on one thread."""

    def __init__(self, size: int, wait_s: float) -> None:
        self.turn = FairTurn()
        self._size = size
        self._wait_s = wait_s
        self._cond = threading.Condition()
        self._queue: list[_Request] = []
        self._jobs = 0  # jobs inside transcribe(): a batch waits for at most this many windows
        self._served_at = 0.0  # when the last batch's results were handed out

    def start(self, model: whisper.Whisper, project: Projection) -> None:
        """Start the decoding thread (a daemon: it only ever waits for or runs a batch)."""
        threading.Thread(target=self._run, args=(model, project), name="whisper-decode", daemon=True).start()

    def decode(self, request: _Request) -> Any:
        """Queue a window and wait for its result."""
        with self._cond:
            self._queue.append(request)
            self._cond.notify_all()
        request.done.wait()
        if isinstance(request.result, BaseException):
            raise request.result
        return request.result

    def job_started(self) -> None:
        """A job entered Whisper's loop."""
        with self._cond:
            self._jobs += 1

    def job_finished(self) -> None:
        """A job left Whisper's loop; a batch waiting for its window need not wait any more."""
        with self._cond:
            self._jobs -= 1
            self._cond.notify_all()

    def _next_batch(self) -> list[_Request]:
        with self._cond:
            while True:
                self._cond.wait_for(lambda: bool(self._queue))
                oldest = self._queue[0]
                batch = [request for request in self._queue if request is oldest or oldest.batches_with(request)]
                batch = batch[: self._size]
                # Wait from the later of the oldest arrival and the last batch's end: the jobs of the
                # batch just served queue their next windows within milliseconds, and without
                # this grace two halves of the jobs would alternate in half-size batches forever.
                left = max(oldest.arrived, self._served_at) + self._wait_s - time.monotonic()
                if not oldest.shares_batch or len(batch) == self._size or len(self._queue) >= self._jobs or left <= 0:
                    self._queue = [request for request in self._queue if request not in batch]
                    return batch
                self._cond.wait(left)

    def _run(self, model: whisper.Whisper, project: Projection) -> None:
        while True:
            batch = self._next_batch()
            self.turn.hold()
            started = time.perf_counter()
            try:
                if not batch[0].shares_batch:
                    torch.manual_seed(batch[0].seed)  # a fallback's samples depend on its window only
                results: list[Any] = decode_windows(
                    model, [r.window for r in batch], [r.options.prompt for r in batch], batch[0].options, project
                )
            except Exception as exc:  # the jobs waiting on this batch fail with it; the thread goes on
                log.exception("decoding a batch of %d windows failed", len(batch))
                results = [exc] * len(batch)
            finally:
                self.turn.release()
            log.debug("decoded %d window(s) in %.2f s", len(batch), time.perf_counter() - started)
            with self._cond:
                self._served_at = time.monotonic()
            for request, result in zip(batch, results, strict=True):
                request.result = result
                request.done.set()


class WhisperEngine:
    """Loads one Whisper model in the background and runs every job's model work through it."""

    def __init__(self) -> None:
        self._batcher: _Batcher  # made by start(), which every model call waits for
        self._ready = threading.Event()
        self._model: whisper.Whisper | None = None
        self.model_name = ""
        self.error: str | None = None

    def start(self, config: Mapping[str, Any]) -> None:
        """Resolve and load the model on a background thread; /readyz turns 200 when done."""
        self.model_name = config["MODEL"]
        device = config["DEVICE"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._batcher = _Batcher(config["BATCH_SIZE"], config["BATCH_WAIT_MS"] / 1000)
        threading.Thread(target=self._load, args=(config, device), name="whisper-load", daemon=True).start()

    def _load(self, config: Mapping[str, Any], device: str) -> None:
        model = self.model_name
        try:
            path = ensure_checkpoint(model, config["MODEL_DIR"], config["MODEL_DOWNLOAD"])
            loaded = whisper.load_model(str(path), device=device)
            if model in whisper._ALIGNMENT_HEADS:
                # load_model(path) cannot know the name, so it would use generic heads.
                loaded.set_alignment_heads(whisper._ALIGNMENT_HEADS[model])
            quantize = config["QUANTIZE"]
            if quantize == "auto":
                quantize = "int8" if device == "cpu" and model in INT8_MODELS else "none"
            project = whisper_projection(loaded)
            if quantize == "int8" and device == "cpu":
                project = quantize_int8(loaded)
            elif quantize == "int8":
                log.warning("WHISPER_FLASK_QUANTIZE=int8 applies to the CPU only; %s runs unquantized", device)
                quantize = "none"
            self._batcher.start(loaded, project)
            self._model = loaded
            log.info("model %s loaded on %s from %s (quantize: %s)", model, device, path, quantize)
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
        """Run Whisper's transcribe loop on audio, its windows decoded in batches with other jobs'.

        With `resume` (a Window an interrupted run reported), start there instead of at 0.
        """
        model = self.wait_until_ready()
        if resume is None:
            return self._run_transcribe(model, audio, options, on_window, ([], []))

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

        resumed_options = {
            **options,
            "clip_timestamps": str(resume.seconds),
            "language": resume.language,
            "initial_prompt": text if resume.prompt else None,
        }
        result = self._run_transcribe(model, audio, resumed_options, on_resumed_window, (canonical, resume.prompt))
        segments = done + _renumbered(result["segments"], len(done))
        tokens = [token for segment in segments for token in segment["tokens"]]
        return {"text": tokenizer.decode(tokens), "segments": segments, "language": result["language"]}

    def _run_transcribe(
        self,
        model: whisper.Whisper,
        audio: np.ndarray,
        options: dict[str, Any],
        on_window: WindowHook,
        prompt_swap: PromptSwap,
    ) -> dict[str, Any]:
        aligns = bool(options.get("word_timestamps"))
        job_model = _JobModel(model, self._batcher, on_window, prompt_swap, aligns)
        self._batcher.job_started()
        try:
            return whisper.transcribe(job_model, audio, verbose=None, fp16=model.device.type == "cuda", **options)
        finally:
            self._batcher.job_finished()
            self._batcher.turn.release()

    def detect_language(self, audio: np.ndarray) -> dict[str, float]:
        """Language probabilities for the first 30 seconds of audio."""
        model = self.wait_until_ready(timeout=0)
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio), model.dims.n_mels).to(model.device)
        self._batcher.turn.hold()
        try:
            _, probs = model.detect_language(mel)
        finally:
            self._batcher.turn.release()
        return dict(probs)


def _renumbered(segments: list[dict[str, Any]], start: int) -> list[dict[str, Any]]:
    return [{**segment, "id": start + index} for index, segment in enumerate(segments)]
