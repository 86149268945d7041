"""Each job's transcription on the loaded model: Whisper's own loop, in parts, past long silences.

engine.py loads the model and starts the model thread; this module is what every job then runs
on them (ARCHITECTURE.md, "The engine"). A job runs Whisper's ``transcribe`` loop on its own
proxy of the model (job_model.py), whose model calls all go to the model thread; before the loop,
stretches without speech are found (speech.py), a long job is cut into parts (parts.py), and a
job whose first 30 s hold no speech gets its language detected where the speech starts.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

import torch
import whisper
from whisper.audio import FRAMES_PER_SECOND, N_FRAMES, N_SAMPLES

from whisper_flask.audio.media import DecodedAudio
from whisper_flask.engine.batching import ModelThread, use_torch_threads
from whisper_flask.engine.chunks import plan_chunks
from whisper_flask.engine.job_model import JobModel, PromptSwap
from whisper_flask.engine.options import Task, TranscribeOptions
from whisper_flask.engine.parts import PartedProgress, part_clips, part_mel, plan_parts, renumbered, run_parts
from whisper_flask.engine.spectrogram import LogMel, log_mel
from whisper_flask.engine.speech import Clip, SpeechDetector, clip_timestamps, clips_after
from whisper_flask.engine.windows import StepCheck, Window, WindowHook

log = logging.getLogger(__name__)


class Transcriber:
    """Runs each job's transcribe loop on a loaded model, its model work sent to the model thread."""

    def __init__(self, thread: ModelThread, speech: SpeechDetector, batch_size: int) -> None:
        self._thread = thread  # started by the engine once the model is loaded
        self._speech = speech
        self._batch_size = batch_size
        self._running_lock = threading.Lock()
        self._running = 0  # transcribe() calls under way: each job's share of the batch places

    def transcribe(
        self,
        model: whisper.Whisper,
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
        # The model thread does the model's work; this thread only computes the spectrogram and
        # filters logits, on one torch thread so as not to compete with it (see ModelThread).
        use_torch_threads(1)
        mel = log_mel(audio, model.dims.n_mels)  # by chunks: the whole file's STFT would not fit
        content = mel.shape[-1] - N_FRAMES
        with self._running_lock:
            self._running += 1
            places = max(1, self._batch_size // self._running)  # a fair share of the decoder steps
        try:
            if options.chunking_strategy is not None:
                return self._run_chunks(model, audio, mel, options, on_window, resume, check, places)
            clips = self._speech.clips(audio, mel[:, :content], check)
            if clips != [(0, content)]:
                skipped = content - sum(end - start for start, end in clips)
                log.info("skipping %.1f s without speech", skipped / FRAMES_PER_SECOND)
            if resume is not None and not resume.parts:  # one loop (or a resume saved before parts existed)
                return self._run_loop(model, mel, options, on_window, resume, check, clips)
            if resume is not None:
                progress = PartedProgress.resumed(resume, on_window)
                return self._run_parts(model, mel, options, progress, check, clips, places)
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
            return self._run_parts(model, mel, options, progress, check, clips, places)
        finally:
            with self._running_lock:
                self._running -= 1

    def _run_chunks(
        self,
        model: whisper.Whisper,
        audio: DecodedAudio,
        mel: torch.Tensor,
        options: TranscribeOptions,
        on_window: WindowHook,
        resume: Window | None,
        check: StepCheck,
        places: int,
    ) -> dict[str, Any]:
        """A chunked job (chunks.py): each chunk of speech a part of its own, `places` of them at once."""
        assert options.chunking_strategy is not None
        if resume is not None:  # the chunks are where the interrupted run cut them
            progress = PartedProgress.resumed(resume, on_window)
        else:
            content = mel.shape[-1] - N_FRAMES  # mel is padded by N_FRAMES, as transcribe() takes it
            chunks = plan_chunks(self._speech.probabilities(audio, check), options.chunking_strategy, content)
            if not chunks:  # no speech heard: as for silent audio, no language either
                return _result([], options.language)
            log.info("transcribing %d chunks of speech, up to %d at once", len(chunks), places)
            language = options.language or self._language_of(model, mel[:, chunks[0].start :])
            progress = PartedProgress.fresh(chunks, language, on_window)
        spans = [(part.start, part.end) for part in progress.parts]
        return self._run_parts(model, mel, options, progress, check, spans, places)

    def _run_parts(
        self,
        model: whisper.Whisper,
        mel: torch.Tensor,
        options: TranscribeOptions,
        progress: PartedProgress,
        check: StepCheck,
        clips: list[Clip],
        places: int,
    ) -> dict[str, Any]:
        """The unfinished parts' loops, `places` at a time, each on a thread (parts.run_parts)."""
        # Every part speaks the job's language: detected once, not per part.
        options = dataclasses.replace(options, language=progress.language)

        def run_part(index: int) -> list[dict[str, Any]]:
            use_torch_threads(1)
            part = progress.parts[index]
            return self._run_loop(
                model, part_mel(mel, part), options, progress.hook(index), progress.window(index),
                progress.checked(check), part_clips(clips, part),
            )["segments"]  # fmt: skip

        return _result(run_parts(progress, run_part, places), progress.language)

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
        keywords = {**options.whisper_keywords(), "clip_timestamps": clip_timestamps(spans, mel.shape[-1] - N_FRAMES)}
        on_window = _counting(on_window, spans)
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

    def detect_language(self, model: whisper.Whisper, audio: DecodedAudio) -> dict[str, float]:
        """Language probabilities for the first 30 seconds of audio."""
        # The spectrogram too is made on the model thread: torch on an HTTP thread would start
        # an OpenMP team of its own beside the model thread's (see ModelThread).
        return self._thread.run(
            lambda: _language_probabilities(model, log_mel(audio, model.dims.n_mels, first_samples=N_SAMPLES))
        )


def _counting(on_window: WindowHook, clips: list[Clip]) -> WindowHook:
    """The hook, given each window with the frames of `clips` left from its seek (what an ETA counts)."""

    def on_counted_window(window: Window) -> None:
        left = sum(end - start for start, end in clips_after(clips, window.seek))
        on_window(dataclasses.replace(window, left=left))

    return on_counted_window


def _result(segments: list[dict[str, Any]], language: str | None) -> dict[str, Any]:
    """A transcribe() result made of segments already decoded."""
    return {"text": "".join(segment["text"] for segment in segments), "segments": segments, "language": language}


def _language_probabilities(model: whisper.Whisper, mel: torch.Tensor) -> dict[str, float]:
    """As transcribe() detects the language: on the first N_FRAMES of the padded spectrogram."""
    return dict(model.detect_language(mel[:, :N_FRAMES].to(model.device))[1])
