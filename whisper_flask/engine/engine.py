"""The inference engine: each job's Whisper transcribe loop, its model work sent to the model thread.

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
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Protocol

import torch
import whisper
from whisper.audio import FRAMES_PER_SECOND, N_FRAMES, N_SAMPLES

from whisper_flask.audio.media import DecodedAudio
from whisper_flask.engine.batching import ModelThread, use_torch_threads, whisper_projection
from whisper_flask.engine.checkpoints import ensure_checkpoint
from whisper_flask.engine.job_model import JobModel, PromptSwap
from whisper_flask.engine.options import Task, TranscribeOptions
from whisper_flask.engine.parts import PartedProgress, part_clips, part_mel, plan_parts, renumbered, run_parts
from whisper_flask.engine.quantize import choose_precision, quantize_int8
from whisper_flask.engine.spectrogram import LogMel, accept_precomputed, log_mel
from whisper_flask.engine.speech import Clip, SpeechDetector, clip_timestamps, clips_after
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


class WhisperEngine:
    """Loads one Whisper model in the background and runs every job's model work through it."""

    def __init__(self) -> None:
        self._thread: ModelThread  # made by start(), which every model call waits for
        self._ready = threading.Event()
        self._model: whisper.Whisper | None = None
        self._running_lock = threading.Lock()
        self._running = 0  # transcribe() calls under way: each job's share of the batch places
        self._batch_size = 1
        self._speech: SpeechDetector  # made by start(), which every model call waits for
        self.model_name = ""
        self.error: str | None = None

    def start(self, settings: Settings) -> None:
        """Resolve and load the model on a background thread; /readyz turns 200 when done."""
        self.model_name = settings.MODEL
        device = settings.DEVICE
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._batch_size = settings.BATCH_SIZE
        self._speech = SpeechDetector(settings.SKIP_NON_SPEECH_S)
        self._thread = ModelThread(self._batch_size, settings.BATCH_WAIT_MS / 1000)
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
            quantize = choose_precision(settings.QUANTIZE, device, model)
            project = whisper_projection(loaded)
            if quantize == "int8":
                project = quantize_int8(loaded)
            self._thread.start(loaded, project, bf16=quantize == "bf16")
            self._speech.load()
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
        """Run Whisper's transcribe loop on audio, its windows decoded step by step beside other jobs'.

        Stretches of 30 s or more without speech are skipped (speech.py). A long file runs as parts
        side by side, as many as the free batch places allow (parts.py).
        With `resume` (a Window an interrupted run reported), each loop starts where it stood.
        `check` runs before every decoder step: a cancel or a stop takes effect within one step.
        """
        model = self.wait_until_ready()
        # The model thread does the model's work; this thread only computes the spectrogram and
        # filters logits, on one torch thread so as not to compete with it (see ModelThread).
        use_torch_threads(1)
        mel = log_mel(audio, model.dims.n_mels)  # by chunks: the whole file's STFT would not fit
        content = mel.shape[-1] - N_FRAMES
        clips = self._speech.clips(audio, mel[:, :content], check)
        if clips != [(0, content)]:
            skipped = content - sum(end - start for start, end in clips)
            log.info("skipping %.1f s without speech", skipped / FRAMES_PER_SECOND)
        with self._running_lock:
            self._running += 1
            places = max(1, self._batch_size // self._running)  # a fair share of the decoder steps
        try:
            if resume is not None and not resume.parts:  # one loop (or a resume saved before parts existed)
                return self._run_loop(model, mel, options, on_window, resume, check, clips)
            if resume is not None:
                return self._run_parts(model, mel, options, PartedProgress.resumed(resume, on_window), check, clips)
            if options.language is None and clips and clips[0][0] > 0:
                # Whisper's loop would detect it in the first 30 s, which hold no speech.
                options = dataclasses.replace(options, language=self._language_of(model, mel[:, clips[0][0] :]))
            parts = plan_parts(mel, content, clips, places)
            if len(parts) == 1:
                return self._run_loop(model, mel, options, on_window, None, check, clips)
            cuts = ", ".join(f"{part.start / FRAMES_PER_SECOND:.1f}" for part in parts[1:])
            log.info("transcribing in %d parts side by side, cut at %s s", len(parts), cuts)
            language = options.language or self._language_of(model, mel)
            progress = PartedProgress.fresh(parts, language, on_window)
            return self._run_parts(model, mel, options, progress, check, clips)
        finally:
            with self._running_lock:
                self._running -= 1

    def _run_parts(
        self,
        model: whisper.Whisper,
        mel: torch.Tensor,
        options: TranscribeOptions,
        progress: PartedProgress,
        check: StepCheck,
        clips: list[Clip],
    ) -> dict[str, Any]:
        """Each unfinished part's loop on a thread of its own (parts.run_parts)."""
        # Every part speaks the job's language: detected once, not per part.
        options = dataclasses.replace(options, language=progress.language)

        def run_part(index: int) -> list[dict[str, Any]]:
            use_torch_threads(1)
            part = progress.parts[index]
            return self._run_loop(
                model, part_mel(mel, part), options, progress.hook(index), progress.window(index),
                progress.checked(check), part_clips(clips, part),
            )["segments"]  # fmt: skip

        return _result(run_parts(progress, run_part), progress.language)

    def _language_of(self, model: whisper.Whisper, mel: torch.Tensor) -> str:
        """The language of the first 30 s, as Whisper's loop would detect it there."""
        if not model.is_multilingual:
            return "en"
        probs = self._thread.run(lambda: _language_probabilities(model, mel))
        return max(probs, key=lambda code: probs[code])

    def _run_loop(
        self,
        model: whisper.Whisper,
        mel: torch.Tensor,
        options: TranscribeOptions,
        on_window: WindowHook,
        resume: Window | None,
        check: StepCheck,
        clips: list[Clip],
    ) -> dict[str, Any]:
        """Whisper's transcribe loop over the clips of a spectrogram (padded by N_FRAMES), from `resume` if given."""
        spans = clips_after(clips, resume.seek if resume else 0)
        if not spans:  # nothing but a long stretch without speech is left
            # No language is detected on audio heard as no speech: as for silent audio (pipeline.py).
            if resume is None:
                return _result([], options.language)
            return _result(resume.segments, options.language or resume.language)
        keywords = {**options.as_dict(), "clip_timestamps": clip_timestamps(spans, mel.shape[-1] - N_FRAMES)}
        if resume is None:
            return self._run_transcribe(model, mel, keywords, on_window, check, ([], []))

        tokenizer = whisper.tokenizer.get_tokenizer(
            model.is_multilingual,
            num_languages=model.num_languages,
            language=resume.language,
            task=(options.task or Task.TRANSCRIBE).value,
        )
        # transcribe() encodes initial_prompt as " " + text.strip(); the proxy swaps that back.
        text = tokenizer.decode(resume.prompt)
        canonical = tokenizer.encode(" " + text.strip()) if resume.prompt else []
        done = resume.segments

        def on_resumed_window(window: Window) -> None:
            on_window(dataclasses.replace(window, segments=done + renumbered(window.segments, len(done))))

        resumed_options = {
            **keywords,
            "language": resume.language,
            "initial_prompt": text if resume.prompt else None,
        }
        result = self._run_transcribe(model, mel, resumed_options, on_resumed_window, check, (canonical, resume.prompt))
        segments = done + renumbered(result["segments"], len(done))
        tokens = [token for segment in segments for token in segment["tokens"]]
        return {"text": tokenizer.decode(tokens), "segments": segments, "language": result["language"]}

    def _run_transcribe(
        self,
        model: whisper.Whisper,
        mel: torch.Tensor,
        options: dict[str, Any],
        on_window: WindowHook,
        check: StepCheck,
        prompt_swap: PromptSwap,
    ) -> dict[str, Any]:
        aligns = bool(options.get("word_timestamps"))
        job_model = JobModel(model, self._thread, on_window, check, prompt_swap, aligns)
        try:
            return whisper.transcribe(job_model, LogMel(mel), verbose=None, fp16=model.device.type == "cuda", **options)
        finally:
            self._thread.release()

    def detect_language(self, audio: DecodedAudio) -> dict[str, float]:
        """Language probabilities for the first 30 seconds of audio."""
        model = self.wait_until_ready(timeout=0)
        # The spectrogram too is made on the model thread: torch on an HTTP thread would start
        # an OpenMP team of its own beside the model thread's (see ModelThread).
        return self._thread.run(
            lambda: _language_probabilities(model, log_mel(audio, model.dims.n_mels, first_samples=N_SAMPLES))
        )


def _result(segments: list[dict[str, Any]], language: str | None) -> dict[str, Any]:
    """A transcribe() result made of segments already decoded."""
    return {"text": "".join(segment["text"] for segment in segments), "segments": segments, "language": language}


def _language_probabilities(model: whisper.Whisper, mel: torch.Tensor) -> dict[str, float]:
    """As transcribe() detects the language: on the first N_FRAMES of the padded spectrogram."""
    return dict(model.detect_language(mel[:, :N_FRAMES].to(model.device))[1])
