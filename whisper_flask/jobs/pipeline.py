"""The pipeline that runs one job: decode its audio, transcribe it window by window, write, finish.

It runs on a pool thread, one job per thread. Its state changes go through the registry; its
model work goes through the engine, which shares one model among all running jobs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from whisper_flask.audio.fetch import UrlFetcher
from whisper_flask.audio.media import DecodedAudio, MediaDecoder
from whisper_flask.engine.engine import Engine
from whisper_flask.exceptions import JobStopped, ServiceError, TransientStorageError, scrub_paths
from whisper_flask.jobs.ports import Registry
from whisper_flask.jobs.progress import JobInterrupted, JobProgress
from whisper_flask.jobs.records import Job, JobStage, JobStatus
from whisper_flask.jobs.registry import JobCancelled
from whisper_flask.jobs.resume import load_resume
from whisper_flask.jobs.retention import INCOMING_PREFIX, Retention
from whisper_flask.jobs.speaker_stage import SpeakerStage
from whisper_flask.jobs.writers import write_transcripts
from whisper_flask.settings import Settings

log = logging.getLogger(__name__)

#: A step the full disk refused is tried again after this long, the wait doubling up to STORAGE_RETRY_MAX_S.
STORAGE_RETRY_FIRST_S = 0.25
STORAGE_RETRY_MAX_S = 10.0

T = TypeVar("T")


class JobPipeline:
    """Runs jobs from the registry through the engine; every job it starts ends in a final state or pending."""

    def __init__(
        self,
        registry: Registry,
        engine: Engine,
        media: MediaDecoder,
        fetcher: UrlFetcher,
        retention: Retention,
        settings: Settings,
    ) -> None:
        self._registry = registry
        self._engine = engine
        self._media = media
        self._fetcher = fetcher
        self._retention = retention
        self._speakers = SpeakerStage(registry, engine, media, settings)
        self._upload_dir = settings.UPLOAD_DIR
        self._transcript_dir = settings.TRANSCRIPT_DIR

    def run(self, ticket: str) -> None:
        """Run the pending job whose turn it is to its end (or back to pending if the service stops meanwhile).

        `ticket` is the id of the job whose arrival made this run; the registry chooses which job starts.
        A full disk never fails a job: each refused write waits for space (`_until_stored`), so the
        work done is kept and the job completes once space returns (ARCHITECTURE.md, "Durability").
        """
        try:
            # Not ended by the ticket's job ending: another run may have started it, and this run then
            # owes the start to the job that run's ticket was for.
            job = self._until_stored(
                ticket, self._registry.start_next, show=False, cancellable=False, transient=Exception
            )
        except JobStopped:
            return  # the service stopping before the full disk let a job start: it stays pending
        if job is None:
            return
        job_id = job.id
        log.info("job %s in_progress (attempt %d)", job_id, job.attempts)
        try:
            # A full disk under the decoder or a fetch waits too; the decode starts again, the resume state holds.
            result = self._until_stored(job_id, lambda: self._transcribe(job))
            self._advance(job_id, JobStage.WRITING, language=result.get("language"), stage_progress=None)
            # StorageFull waits for space; WriteFailed (a read-only directory, say) fails the job.
            self._until_stored(job_id, lambda: write_transcripts(result, self._transcript_dir, job_id))
            self._until_stored(job_id, lambda: self._registry.finish(job_id, JobStatus.COMPLETED))
        # Stops are JobStopped, a BaseException: only these two handlers see them, never the ones below.
        except JobCancelled:
            pass  # the registry recorded it; its files go below
        except JobInterrupted:
            self._put_back(job_id)
        except ServiceError as exc:  # invalid audio, the model unavailable, a failed write: the job's reason
            self._fail(job_id, exc.code, str(exc))
        except Exception as exc:  # a worker thread must survive any job, and the job must end
            log.exception("job %s crashed", job_id)
            self._fail(job_id, "transcription_failed", f"{type(exc).__name__}: {scrub_paths(str(exc))}")
        finally:
            self._release(job_id)

    def _fail(self, job_id: str, code: str, message: str) -> None:
        """Record the job's failure, waiting for disk space if need be."""
        try:
            self._until_stored(job_id, lambda: self._registry.finish(job_id, JobStatus.FAILED, code, message))
        except JobCancelled:
            pass
        except JobInterrupted:  # still full at the stop: the store keeps it running, and a restart runs it again
            log.warning("job %s failed (%s) but could not be recorded before the service stopped", job_id, code)
        except Exception:  # the store refused for another reason (busy, read-only): the thread must go on
            log.exception("job %s failed (%s) but the failure could not be recorded", job_id, code)
            self._registry.abandon(job_id)

    def _put_back(self, job_id: str) -> None:
        try:
            self._registry.put_back(job_id)
        except TransientStorageError as exc:  # stored as running: the next start queues it again (crash_rule.py)
            log.warning("job %s could not be put back to pending: %s", job_id, exc)

    def _until_stored(
        self,
        job_id: str,
        step: Callable[[], T],
        *,
        show: bool = True,
        cancellable: bool = True,
        transient: type[Exception] = TransientStorageError,
    ) -> T:
        """Run `step`; while it raises `transient` (a full disk, the database away) try again, with a bounded backoff.

        Meanwhile the job shows the stage `waiting_for_storage` (if `show`). JobInterrupted if the
        service stops first, JobCancelled if the job is cancelled: the stored record is then the last
        one the disk took, and nothing in memory went ahead of it (the registry writes first).
        """
        delay, waiting = STORAGE_RETRY_FIRST_S, False
        while True:
            try:
                done = step()
            except transient as exc:
                if not waiting:
                    # Anything but a full disk is unexpected here (a start refused): its traceback goes along.
                    log.warning("job %s waits until its write is stored: %s", job_id, exc,
                                exc_info=not isinstance(exc, TransientStorageError))  # fmt: skip
                    if show:
                        self._show_waiting(job_id)
                    waiting = True
            else:
                if waiting:
                    log.info("job %s goes on: the disk took its write", job_id)
                return done
            if not cancellable:
                self._registry.wait_until_closed(delay)
            elif self._registry.wait_until_ended(job_id, delay):  # woken early by a cancel or the stop
                raise JobCancelled(job_id)
            if not self._registry.accepting:
                raise JobInterrupted(job_id)
            delay = min(2 * delay, STORAGE_RETRY_MAX_S)

    def _show_waiting(self, job_id: str) -> None:
        # Stored while the store still takes writes (only the transcript files were refused), so a
        # restart knows the job ran no model step and does not charge it (crash_rule.py).
        try:
            self._registry.update(job_id, stage=JobStage.WAITING_FOR_STORAGE)
        except TransientStorageError:
            self._registry.update(job_id, persist=False, stage=JobStage.WAITING_FOR_STORAGE)

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
            if not job.options.diarize:
                return self._transcribe_audio(job, audio, check)
            # Kept while it diarizes: a restart then does not transcribe its last window again.
            result = self._speakers.transcribed(job) or self._speakers.keep(
                job, self._transcribe_audio(job, audio, check)
            )
            return self._speakers.label(job, audio, result, check)

    def _transcribe_audio(self, job: Job, audio: DecodedAudio, check: Callable[[], None]) -> dict[str, Any]:
        if audio.is_silent():
            return {"text": "", "segments": [], "language": job.options.language}
        resume = load_resume(self._transcript_dir, job.id)
        if resume is not None:
            log.info("job %s resumes at %.1f s", job.id, resume.seconds)
        progress = JobProgress(self._registry, self._transcript_dir, job.id, audio.duration)
        return self._engine.transcribe(audio, job.options, progress.on_window, resume, progress.checked(check))

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
        self._until_stored(job_id, lambda: self._registry.update(job_id, stage=stage, **changes))
        log.info("job %s %s", job_id, stage.value)

    def _release(self, job_id: str) -> None:
        view = self._registry.view(job_id)
        if view.job.status.terminal:  # a job put back to pending keeps its upload
            self._retention.release(view.job)
