"""The inference engine: the only code that touches the shared Whisper model.

openai-whisper's model is not thread-safe: ``decode`` installs kv-cache forward
hooks on shared modules and word alignment installs cross-attention hooks, so
two overlapping calls corrupt each other. Each job therefore runs Whisper's own
``transcribe`` loop and ``DecodingTask`` (temperature fallback, prompts, beam
search, timestamps: not forked) on a per-job proxy of the model, and the proxy
makes the model take turns:

- a FIFO turn is taken before every encoder pass and every decoder step, so jobs
  interleave step by step: a short job never waits for a long job's window;
- a job's kv-cache hooks act only in its own thread, so another job's steps
  between two of its own leave its cache alone;
- torch's global RNG (temperature sampling) is saved and restored as the turn
  changes hands, and seeded per window, so a job's transcript does not depend
  on the jobs beside it;
- between steps the turn stays with its holder, so word alignment (hooks
  installed after a window's decode) runs before any other job's step.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
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
    """Hands the model to one thread at a time, in the order they asked (FIFO), in time slices."""

    def __init__(self, slice_s: float = 0.1) -> None:
        self._cond = threading.Condition()
        self._waiting: deque[int] = deque()
        self._holder: int | None = None
        self._since = 0.0
        # Handing over at every decoder step cost 22 % of throughput with 4 jobs (thread
        # wake-ups); a slice bounds a newcomer's wait to ~0.1 s plus one step instead.
        self._slice_s = slice_s

    def take(self) -> None:
        """Take the turn; a holder whose slice is up goes to the back of the line if others wait."""
        me = threading.get_ident()
        with self._cond:
            if self._holder == me:
                if not self._waiting or time.monotonic() - self._since < self._slice_s:
                    return
                self._holder = None
                self._cond.notify_all()
            self._waiting.append(me)
            self._cond.wait_for(lambda: self._holder is None and self._waiting[0] == me)
            self._waiting.popleft()
            self._holder = me
            self._since = time.monotonic()

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
        self._cuda = model.device.type == "cuda"
        self.encoder = _Step(self, model.encoder)
        self.decoder = _Step(self, model.decoder)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def take_turn(self) -> None:
        """Wait for the model; torch's RNG state leaves and comes back with this job."""
        # Only the holder samples, so the state now is this job's own (or about to be reseeded).
        rng = torch.cuda.get_rng_state() if self._cuda else torch.get_rng_state()
        self._turn.take()
        (torch.cuda.set_rng_state if self._cuda else torch.set_rng_state)(rng)

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
        self.take_turn()
        torch.manual_seed(window.seek)  # temperature fallback's samples depend on the window only
        return whisper.decoding.decode(self, mel, options)

    def install_kv_cache_hooks(self, cache: dict[Any, torch.Tensor] | None = None) -> Any:
        cache, hooks = self._model.install_kv_cache_hooks(cache)
        owner = threading.get_ident()
        for handle in hooks:
            registry = handle.hooks_dict_ref()
            registry[handle.id] = _in_thread(owner, registry[handle.id])
        return cache, hooks

    def detect_language(self, mel: torch.Tensor, tokenizer: Any = None) -> Any:
        self.take_turn()
        return self._model.detect_language(mel, tokenizer)

    def __call__(self, mel: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # Word alignment: its hooks were installed while this job holds the turn.
        self._turn.hold()
        return self._model(mel, tokens)


class _Step:
    """The encoder or decoder of a job's model: each call waits for the job's turn."""

    def __init__(self, job: _JobModel, module: torch.nn.Module) -> None:
        self._job = job
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._job.take_turn()
        return self._module(*args, **kwargs)


def _in_thread(owner: int, hook: Callable[..., Any]) -> Callable[..., Any]:
    """A forward hook that acts only in the owner's thread (None leaves the output as it is)."""

    def hook_in_owner_thread(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
        return hook(module, inputs, output) if threading.get_ident() == owner else None

    return hook_in_owner_thread


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
        """Run Whisper's transcribe loop on audio, sharing the model with other jobs step by step.

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
        prompt_swap: tuple[list[int], list[int]],
    ) -> dict[str, Any]:
        job_model = _JobModel(model, self._turn, on_window, prompt_swap)
        try:
            return whisper.transcribe(job_model, audio, verbose=None, fp16=model.device.type == "cuda", **options)
        finally:
            self._turn.release()

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
