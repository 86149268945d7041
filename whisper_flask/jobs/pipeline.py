"""The pipeline that runs one job: decode its audio, transcribe it window by window, write, finish.

It runs on a pool thread, one job per thread. Its state changes go through the registry; its
model work goes through the engine, which shares one model among all running jobs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from whisper_flask.audio.fetch import UrlFetcher
from whisper_flask.audio.media import MediaDecoder
from whisper_flask.engine.engine import Engine
from whisper_flask.engine.windows import Window
from whisper_flask.exceptions import JobStopped, ServiceError, WriteFailed, scrub_paths
from whisper_flask.jobs.records import Job, JobStage, JobStatus
from whisper_flask.jobs.registry import JobCancelled, JobRegistry
from whisper_flask.jobs.resume import load_resume, save_resume
from whisper_flask.jobs.retention import INCOMING_PREFIX, Retention
from whisper_flask.jobs.writers import write_transcripts

log = logging.getLogger(__name__)

#: Progress reaches the store at most this often per job; state changes always do.
PERSIST_INTERVAL_S = 1.0


class JobInterrupted(JobStopped):
    """The service is stopping; the job goes back to pending and resumes at this window."""


class JobPipeline:
    """Runs jobs from the registry through the engine; every job it starts ends in a final state or pending."""

    def __init__(
        self,
        registry: JobRegistry,
        engine: Engine,
        media: MediaDecoder,
        fetcher: UrlFetcher,
        retention: Retention,
        upload_dir: Path,
        transcript_dir: Path,
    ) -> None:
        self._registry = registry
        self._engine = engine
        self._media = media
        self._fetcher = fetcher
        self._retention = retention
        self._upload_dir = upload_dir
        self._transcript_dir = transcript_dir

    def run(self, ticket: str) -> None:
        """Run the pending job whose turn it is to its end (or back to pending if the service stops meanwhile).

        `ticket` is the id of the job whose arrival made this run; the registry chooses which job starts.
        """
        job = self._registry.start_next()
        if job is None:
            return
        job_id = job.id
        log.info("job %s in_progress (attempt %d)", job_id, job.attempts)
        try:
            result = self._transcribe(job)
            self._advance(job_id, JobStage.WRITING, language=result.get("language"))
            try:
                write_transcripts(result, self._transcript_dir, job_id)
            except OSError as exc:
                raise WriteFailed(exc) from exc
            self._registry.finish(job_id, JobStatus.COMPLETED)
        # Stops are JobStopped, a BaseException: only these two handlers see them, never the ones below.
        except JobCancelled:
            pass  # the registry recorded it; its files go below
        except JobInterrupted:
            self._registry.put_back(job_id)
        except ServiceError as exc:  # invalid audio, the model unavailable, a failed write: the job's reason
            self._registry.finish(job_id, JobStatus.FAILED, exc.code, str(exc))
        except Exception as exc:  # a worker thread must survive any job, and the job must end
            log.exception("job %s crashed", job_id)
            message = f"{type(exc).__name__}: {scrub_paths(str(exc))}"
            self._registry.finish(job_id, JobStatus.FAILED, "transcription_failed", message)
        finally:
            self._release(job_id)

    def _transcribe(self, job: Job) -> dict[str, Any]:
        def check() -> None:  # polled while ffmpeg runs, and before every decoder step
            if not self._registry.accepting:
                raise JobInterrupted(job.id)
            self._registry.check_active(job.id)

        path, duration = self._upload_dir / job.upload_name, job.duration
        if job.source_url is not None and not path.exists():
            duration = self._fetch(job, path, check)
        # Probed when it was uploaded or fetched: its duration sets the decoder's time limit.
        with self._media.decode(path, check, duration) as audio:
            self._advance(job.id, JobStage.TRANSCRIBING, duration=audio.duration)
            if audio.is_silent():
                return {"text": "", "segments": [], "language": job.options.language}
            resume = load_resume(self._transcript_dir, job.id)
            if resume is not None:
                log.info("job %s resumes at %.1f s", job.id, resume.seconds)
            progress = _Progress(self._registry, self._transcript_dir, job.id, audio.duration)
            return self._engine.transcribe(audio, job.options, progress.on_window, resume, check)

    def _fetch(self, job: Job, path: Path, check: Callable[[], None]) -> float | None:
        """Fetch the job's audio from its URL and probe it; its duration."""
        assert job.source_url is not None
        self._advance(job.id, JobStage.FETCHING)
        # A partial name that the sweep removes if the process dies mid-fetch; only a whole,
        # probed file takes the job's upload name (a resumed job fetches again otherwise).
        partial = self._upload_dir / f"{INCOMING_PREFIX}{job.id}"
        try:
            self._fetcher.fetch(job.source_url, partial, check)
            duration = self._media.probe(partial, check).duration
            partial.rename(path)
        finally:
            partial.unlink(missing_ok=True)
        self._advance(job.id, JobStage.DECODING_AUDIO, duration=duration)
        return duration

    def _advance(self, job_id: str, stage: JobStage, **changes: Any) -> None:
        if not self._registry.accepting:
            raise JobInterrupted(job_id)
        self._registry.update(job_id, stage=stage, **changes)
        log.info("job %s %s", job_id, stage.value)

    def _release(self, job_id: str) -> None:
        view = self._registry.view(job_id)
        if view.job.status.terminal:  # a job put back to pending keeps its upload
            self._retention.release(view.job)


class _Progress:
    """One running job's progress: its position, speed and ETA, reported as each window starts."""

    def __init__(self, registry: JobRegistry, transcript_dir: Path, job_id: str, duration: float) -> None:
        self._registry = registry
        self._transcript_dir = transcript_dir
        self._job_id = job_id
        self._duration = duration
        self._started = time.monotonic()
        self._persisted = 0.0
        self._processed = 0.0
        self._resumable_seek = 0  # the furthest window saved for a resume

    def on_window(self, window: Window) -> None:
        """Record the decoder's position; save the resume state; raise to stop the job here."""
        self._processed = round(max(self._processed, min(window.seconds, self._duration)), 3)
        changes: dict[str, Any] = {"processed_seconds": self._processed}
        if self._duration > 0:
            # 100 is kept for "completed", so a finished last window shows 99.9 at most.
            changes["progress"] = min(99.9, round(100 * self._processed / self._duration, 1))
        elapsed = time.monotonic() - self._started
        if self._processed > 0 and elapsed > 0:
            changes["eta_seconds"] = round((self._duration - self._processed) * elapsed / self._processed, 1)
        now = time.monotonic()
        persist = now - self._persisted >= PERSIST_INTERVAL_S
        if persist:
            self._persisted = now
        # Saved before the progress is shown: a stream that sees the job move on reads these
        # segments. A cancelled job's file goes with its other files when the pipeline ends.
        if window.seek > self._resumable_seek:
            self._resumable_seek = window.seek
            try:
                save_resume(self._transcript_dir, self._job_id, window)
            except OSError as exc:
                # The transcript could not be written either: fail now, not after the whole file.
                raise WriteFailed(exc) from exc
        self._registry.update(self._job_id, persist=persist, **changes)  # JobCancelled stops the job here
        # Checked after saving: a stopped job resumes at exactly this window.
        if not self._registry.accepting:
            raise JobInterrupted(self._job_id)
