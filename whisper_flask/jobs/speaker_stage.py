"""A diarized job's speaker stage: who spoke when, the known speakers named, each segment labelled.

It runs on the job's pool thread after the transcription, on the same decoded audio (pipeline.py).
Its finished transcription and diarization are kept (resume.py) until the job ends, so a restart
does neither again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from whisper_flask.audio.media import DecodedAudio, MediaDecoder
from whisper_flask.engine.diarization import ProgressHook
from whisper_flask.engine.engine import Engine
from whisper_flask.engine.speakers import label_segments, speaker_names
from whisper_flask.engine.windows import StepCheck
from whisper_flask.exceptions import TransientStorageError
from whisper_flask.jobs.ports import Registry
from whisper_flask.jobs.records import Job, JobStage
from whisper_flask.jobs.resume import load_diarization, load_transcribed, save_diarization, save_transcribed
from whisper_flask.settings import Settings

log = logging.getLogger(__name__)

#: A speaker takes a known speaker's name when their voiceprints' cosine is at least this. Measured
#: on the shared recordings (bench/diarization.py's speakers, one utterance against another): the
#: same speaker 0.58 to 0.98 (0.58 only against a 2 s sample), different speakers 0.30 to 0.62.
KNOWN_SPEAKER_SIMILARITY = 0.65
#: The stage's progress reaches the store at most this often (the pipeline's rule for progress).
PERSIST_INTERVAL_S = 1.0


class SpeakerStage:
    """Labels a transcribed job's segments with their speakers."""

    def __init__(self, registry: Registry, engine: Engine, media: MediaDecoder, settings: Settings) -> None:
        self._registry = registry
        self._engine = engine
        self._media = media
        self._upload_dir = settings.UPLOAD_DIR
        self._transcript_dir = settings.TRANSCRIPT_DIR

    def transcribed(self, job: Job) -> dict[str, Any] | None:
        """The job's transcription, if it finished before a restart (keep() kept it)."""
        return load_transcribed(self._transcript_dir, job.id)

    def keep(self, job: Job, result: dict[str, Any]) -> dict[str, Any]:
        """Keep a finished transcription until the job ends (best effort: only a restart needs it); the result."""
        try:
            save_transcribed(self._transcript_dir, job.id, result)
        except TransientStorageError as exc:
            log.warning("job %s: transcription not kept: %s", job.id, exc)
        return result

    def label(self, job: Job, audio: DecodedAudio, result: dict[str, Any], check: StepCheck) -> dict[str, Any]:
        """The result with a speaker on every segment and word, and the speakers' turns."""
        diarization = load_diarization(self._transcript_dir, job.id)
        if diarization is None:
            # The transcription's ETA no longer holds; the stage's own percentage says how far it is.
            self._registry.update(job.id, stage=JobStage.DIARIZING, stage_progress=0.0, eta_seconds=None)
            log.info("job %s diarizing", job.id)
            started = time.monotonic()
            diarization = self._engine.diarize(audio, job.options, check, self._progress(job.id))
            log.info("job %s: %d speakers in %.1f s", job.id, len(diarization.voiceprints), time.monotonic() - started)
            try:
                save_diarization(self._transcript_dir, job.id, diarization)
            except TransientStorageError as exc:  # only a restart needs it: the job goes on (and waits to write)
                log.warning("job %s: diarization not kept: %s", job.id, exc)
        names = speaker_names(
            diarization, [self._voiceprint(job, name, check) for name in job.speaker_samples],
            job.options.known_speakers or (), KNOWN_SPEAKER_SIMILARITY,
        )  # fmt: skip
        return label_segments(result, diarization, names)

    def _progress(self, job_id: str) -> ProgressHook:
        persisted = 0.0

        def on_progress(fraction: float) -> None:
            nonlocal persisted
            now = time.monotonic()
            persist = now - persisted >= PERSIST_INTERVAL_S
            if persist:
                persisted = now
            try:
                self._registry.update(job_id, persist=persist, stage_progress=min(99.9, round(100 * fraction, 1)))
            except TransientStorageError:
                self._registry.update(job_id, persist=False, stage_progress=min(99.9, round(100 * fraction, 1)))

        return on_progress

    def _voiceprint(self, job: Job, name: str, check: StepCheck) -> tuple[float, ...] | None:
        """A known speaker's voiceprint from its sample; None if it holds no speech (it then names nobody)."""
        path = self._upload_dir / name
        with self._media.decode(path, check, None) as sample:
            return self._engine.voiceprint(sample, check)
