"""The job service: a lock-protected registry backed by the store, and the worker pool.

Writes to the store happen under the registry lock so that the stored record
never goes back in time; model work never does (it runs in the engine, unlocked).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol

import click
import numpy as np
from flask import Flask, current_app
from whisper.audio import SAMPLE_RATE

from .audio import AudioDecodeError, decode_audio, is_silent
from .engine import ModelUnavailable, Window, WindowHook
from .errors import ApiError
from .formats import FORMATS, load_resume, resume_path, save_resume, transcript_path, write_transcripts
from .records import Job, JobStage, JobStatus, iso, utcnow
from .store import JobStore

log = logging.getLogger(__name__)

#: A job found in progress at start-up this many times took the process down with it.
MAX_ATTEMPTS = 2
#: Progress reaches the store at most this often per job; state changes always do.
PERSIST_INTERVAL_S = 1.0


class Engine(Protocol):
    """What the service needs from an inference engine (real or fake)."""

    model_name: str
    error: str | None

    @property
    def ready(self) -> bool: ...

    @property
    def is_multilingual(self) -> bool: ...

    def start(self, config: Mapping[str, Any]) -> None: ...

    def transcribe(
        self, audio: np.ndarray, options: dict[str, Any], on_window: WindowHook, resume: Window | None = None
    ) -> dict[str, Any]: ...

    def detect_language(self, audio: np.ndarray) -> dict[str, float]: ...


class JobCancelled(Exception):
    """Raised at a window boundary when the job was cancelled."""


class JobInterrupted(Exception):
    """Raised at a window boundary when the service is stopping."""


@dataclasses.dataclass
class _Running:
    started: float  # monotonic time transcription began, for the measured speed
    persisted: float = 0.0
    resumable_seek: int = 0  # the furthest window saved for a resume


class JobService:
    """Accepts jobs, runs them on a bounded pool through the engine, and answers for their state."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[str, Job] = {}  # pending and in progress; the rest live in the store
        self._running: dict[str, _Running] = {}
        self._stopping = threading.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._store: JobStore | None = None
        self._sweeper: threading.Thread | None = None
        self.engine: Engine

    def init_app(self, app: Flask, engine: Engine) -> None:
        """Open the store, start the engine and the pool, and queue again what a restart left."""
        config = app.config
        self.engine = engine
        self.upload_dir: Path = config["UPLOAD_DIR"]
        self.transcript_dir: Path = config["TRANSCRIPT_DIR"]
        self.keep_uploads: bool = config["KEEP_UPLOADS"]
        self.max_workers: int = config["MAX_WORKERS"]
        self.capacity: int = config["MAX_QUEUED_JOBS"]
        self.retention = timedelta(days=config["RETENTION_DAYS"])
        self.expired_keep = timedelta(days=config["EXPIRED_KEEP_DAYS"])
        self.sweep_interval: float = config["SWEEP_INTERVAL_S"]
        self._store = JobStore(self.transcript_dir / "jobs.sqlite3")
        app.extensions["whisper_flask"] = self
        if _built_for_cli_command():
            # `flask models ...` must not load the model or take jobs from the running server.
            return
        engine.start(config)
        self._executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix="whisper-job")
        self._recover()
        self._sweeper = threading.Thread(target=self._sweep_periodically, name="whisper-sweep", daemon=True)
        self._sweeper.start()

    @property
    def store(self) -> JobStore:
        """The durable store (open after init_app)."""
        assert self._store is not None, "JobService.init_app was not called"
        return self._store

    def _recover(self) -> None:
        for job in self.store.unfinished():
            if job.status is JobStatus.IN_PROGRESS and job.attempts >= MAX_ATTEMPTS:
                job.status, job.error_code, job.finished_at = JobStatus.FAILED, "interrupted", utcnow()
                job.error = f"the service stopped during this job {job.attempts} times; not retrying"
                self.store.update(job)
                log.warning("job %s failed: interrupted %d times", job.id, job.attempts)
                continue
            if job.status is JobStatus.IN_PROGRESS:
                _reset_to_pending(job)
                self.store.update(job)
            with self._lock:
                self._active[job.id] = job
            self._submit(job.id)
            log.info("job %s queued again after restart (attempts %d)", job.id, job.attempts)

    def _submit(self, job_id: str) -> None:
        assert self._executor is not None, "the service was not started"
        self._executor.submit(self._run, job_id)

    # -- intake ---------------------------------------------------------------------------

    def check_capacity(self) -> None:
        """Raise 503 if no job can be accepted now (called before reading an upload's body)."""
        with self._lock:
            self._refuse_if_full()

    def _refuse_if_full(self) -> None:
        # Caller holds the lock.
        if self._stopping.is_set() or self._executor is None:
            raise ApiError(503, "shutting_down", "the service is not accepting jobs", {"Retry-After": "30"})
        if len(self._active) >= self.capacity:
            raise ApiError(
                503,
                "queue_full",
                f"{len(self._active)} jobs are queued or running, the limit is {self.capacity}; retry later",
                {"Retry-After": str(self._retry_after())},
            )

    def _retry_after(self) -> int:
        etas = [job.eta_seconds for job in self._active.values() if job.eta_seconds is not None]
        return max(1, min(600, math.ceil(min(etas)))) if etas else 30

    def create_job(self, upload_name: str, filename: str, options: dict[str, Any], client: str | None = None) -> Job:
        """Record a new job durably and queue it; the caller answers 202 after this returns."""
        job = Job(
            id=uuid.uuid4().hex,
            filename=filename,
            upload_name=upload_name,
            options=options,
            model=self.engine.model_name,
        )
        with self._lock:
            self._refuse_if_full()  # again: another upload may have taken the last place meanwhile
            job.seq = self.store.insert(job)
            self._active[job.id] = job
            snapshot = dataclasses.replace(job)
        self._submit(job.id)
        log.info("job %s pending: %s from %s", job.id, filename, client)
        return snapshot

    # -- queries --------------------------------------------------------------------------

    def get_job(self, job_id: str) -> Job | None:
        """A consistent copy of the job's record, or None if unknown."""
        with self._lock:
            job = self._active.get(job_id)
            if job is not None:
                return dataclasses.replace(job)
        return self.store.get(job_id)

    def queue_position(self, job_id: str) -> int | None:
        """1 for the next pending job to start, None if the job is not pending."""
        with self._lock:
            pending = sorted((job.seq, job.id) for job in self._active.values() if job.status is JobStatus.PENDING)
        ids = [job for _, job in pending]
        return ids.index(job_id) + 1 if job_id in ids else None

    def list_jobs(self, status: JobStatus | None, limit: int, offset: int) -> list[Job]:
        """Jobs newest first, with live progress for the active ones."""
        jobs = self.store.list_jobs(status, limit, offset)
        with self._lock:
            return [dataclasses.replace(self._active.get(job.id, job)) for job in jobs]

    def queue_stats(self) -> dict[str, int]:
        """Counts of pending and running jobs, and the limits."""
        with self._lock:
            statuses = [job.status for job in self._active.values()]
        return {
            "pending": statuses.count(JobStatus.PENDING),
            "in_progress": statuses.count(JobStatus.IN_PROGRESS),
            "capacity": self.capacity,
            "workers": self.max_workers,
        }

    # -- cancellation and shutdown ---------------------------------------------------------

    def cancel_job(self, job_id: str) -> Job | None:
        """Cancel a pending or running job (a running one stops at its next window); None if unknown."""
        with self._lock:
            job = self._active.pop(job_id, None)
            if job is not None:
                job.status, job.finished_at = JobStatus.CANCELLED, utcnow()
                job.eta_seconds = None
                self.store.update(job)
                running = job_id in self._running
                snapshot = dataclasses.replace(job)
        if job is None:
            return self.store.get(job_id)
        if not running:
            # A pending job owns its upload alone; a running one cleans up when it stops.
            self._remove_files(snapshot)
        log.info("job %s cancelled", job_id)
        return snapshot

    def shutdown(self) -> None:
        """Stop taking work, stop running jobs at their next window and put them back to pending."""
        self._stopping.set()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        if self._sweeper is not None:
            self._sweeper.join()
        if self._store is not None:
            self._store.close()

    # -- retention --------------------------------------------------------------------------

    def _sweep_periodically(self) -> None:
        while not self._stopping.wait(self.sweep_interval):
            try:
                self.sweep()
            except Exception:  # the next sweep tries again; the service must not lose its sweeper
                log.exception("retention sweep failed")

    def sweep(self) -> None:
        """Delete the files of jobs that ended RETENTION_DAYS ago, and forget ids expired long enough."""
        now = datetime.now(timezone.utc)
        for job in self.store.finished_before(iso(now - self.retention)):
            self._delete_files(job, transcripts=True, upload=True)
            job.expired_at = iso(now)
            self.store.update(job)
            log.info("job %s expired", job.id)
        forgotten = self.store.forget_expired_before(iso(now - self.expired_keep))
        if forgotten:
            log.info("forgot %d expired jobs", forgotten)

    # -- the pipeline -----------------------------------------------------------------------

    def _run(self, job_id: str) -> None:
        with self._lock:
            job = self._active.get(job_id)
            if job is None or job.status is not JobStatus.PENDING or self._stopping.is_set():
                return  # cancelled while queued, or stopping: it stays pending in the store
            job.status, job.stage, job.started_at = JobStatus.IN_PROGRESS, JobStage.DECODING_AUDIO, utcnow()
            job.attempts += 1
            self.store.update(job)
            self._running[job_id] = _Running(started=time.monotonic())
            upload = self.upload_dir / job.upload_name
            options = dict(job.options)
        log.info("job %s in_progress (attempt %d)", job_id, job.attempts)
        try:
            audio = decode_audio(upload)
            self._advance(job_id, JobStage.TRANSCRIBING, duration=round(len(audio) / SAMPLE_RATE, 3))
            result: dict[str, Any]
            if is_silent(audio):
                result = {"text": "", "segments": [], "language": options.get("language")}
            else:
                resume = load_resume(self.transcript_dir, job_id)
                if resume is not None:
                    log.info("job %s resumes at %.1f s", job_id, resume.seconds)
                result = self.engine.transcribe(audio, options, lambda w: self._on_window(job_id, w), resume)
            self._advance(job_id, JobStage.WRITING, language=result.get("language"))
            try:
                write_transcripts(result, self.transcript_dir, job_id)
            except OSError as exc:
                raise _WriteFailed(exc) from exc
            self._finish(job_id, JobStatus.COMPLETED)
        except JobCancelled:
            pass  # cancel_job already recorded it; _cleanup removes the files
        except JobInterrupted:
            self._put_back(job_id)
        except AudioDecodeError as exc:
            self._finish(job_id, JobStatus.FAILED, "invalid_audio", str(exc))
        except ModelUnavailable as exc:
            self._finish(job_id, JobStatus.FAILED, "model_unavailable", str(exc))
        except _WriteFailed as exc:
            self._finish(job_id, JobStatus.FAILED, "write_failed", str(exc))
        except Exception as exc:  # a worker thread must survive any job, and the job must end
            log.exception("job %s crashed", job_id)
            self._finish(job_id, JobStatus.FAILED, "transcription_failed", f"{type(exc).__name__}: {exc}")
        finally:
            self._cleanup(job_id)

    def _active_job(self, job_id: str) -> Job:
        # Caller holds the lock.
        job = self._active.get(job_id)
        if job is None or job.status is JobStatus.CANCELLED:
            raise JobCancelled(job_id)
        return job

    def _check_continue(self, job_id: str) -> Job:
        # Caller holds the lock.
        job = self._active_job(job_id)
        if self._stopping.is_set():
            raise JobInterrupted(job_id)
        return job

    def _advance(self, job_id: str, stage: JobStage, **changes: Any) -> None:
        with self._lock:
            job = self._check_continue(job_id)
            job.stage = stage
            for name, value in changes.items():
                setattr(job, name, value)
            if stage is JobStage.TRANSCRIBING:
                self._running[job_id].started = time.monotonic()
            self.store.update(job)
        log.info("job %s %s", job_id, stage.value)

    def _on_window(self, job_id: str, window: Window) -> None:
        with self._lock:
            job = self._active_job(job_id)
            run = self._running[job_id]
            duration = job.duration or 0.0
            job.processed_seconds = round(max(job.processed_seconds, min(window.seconds, duration)), 3)
            if duration > 0:
                # 100 is kept for "completed", so a finished last window shows 99.9 at most.
                job.progress = min(99.9, round(100 * job.processed_seconds / duration, 1))
            elapsed = time.monotonic() - run.started
            if job.processed_seconds > 0 and elapsed > 0:
                speed = job.processed_seconds / elapsed
                job.eta_seconds = round((duration - job.processed_seconds) / speed, 1)
            now = time.monotonic()
            if now - run.persisted >= PERSIST_INTERVAL_S:
                run.persisted = now
                self.store.update(job)
            advanced = window.seek > run.resumable_seek
            if advanced:
                run.resumable_seek = window.seek
        if advanced:
            # Only this job's thread writes its resume file, so no lock is needed for it.
            try:
                save_resume(self.transcript_dir, job_id, window)
            except OSError as exc:
                # The transcript could not be written either: fail now, not after the whole file.
                raise _WriteFailed(exc) from exc
        # Checked after saving: a stopped job resumes at exactly this window.
        if self._stopping.is_set():
            raise JobInterrupted(job_id)

    def _finish(self, job_id: str, status: JobStatus, code: str | None = None, message: str | None = None) -> None:
        with self._lock:
            job = self._active.get(job_id)
            if job is None:
                return  # cancelled meanwhile: that is its final state
            del self._active[job_id]
            job.status, job.finished_at, job.eta_seconds = status, utcnow(), None
            if status is JobStatus.COMPLETED:
                job.stage, job.progress, job.processed_seconds = JobStage.DONE, 100.0, job.duration or 0.0
            job.error_code, job.error = code, message
            self.store.update(job)
        if status is JobStatus.COMPLETED:
            log.info("job %s completed", job_id)
        else:
            log.warning("job %s %s: %s", job_id, status.value, message)

    def _put_back(self, job_id: str) -> None:
        with self._lock:
            job = self._active.get(job_id)
            if job is None:
                return
            job.attempts -= 1  # a graceful stop is not the job's fault
            _reset_to_pending(job)
            self.store.update(job)
        log.info("job %s back to pending for the next start", job_id)

    def _cleanup(self, job_id: str) -> None:
        with self._lock:
            self._running.pop(job_id, None)
            job = self._active.get(job_id)
        if job is not None:
            return  # still pending (put back): keep its upload
        final = self.store.get(job_id)
        if final is not None:
            self._remove_files(final)

    def _remove_files(self, job: Job) -> None:
        cancelled = job.status is JobStatus.CANCELLED
        self._delete_files(job, transcripts=cancelled, upload=cancelled or not self.keep_uploads)

    def _delete_files(self, job: Job, *, transcripts: bool, upload: bool) -> None:
        """Remove an ended job's resume state, and its transcripts and audio if asked; file by file."""
        paths = [resume_path(self.transcript_dir, job.id)]
        if transcripts:
            paths += [transcript_path(self.transcript_dir, job.id, fmt) for fmt in FORMATS]
        if upload:
            paths.append(self.upload_dir / job.upload_name)
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:  # a read-only directory must not stop the rest, nor the worker
                log.warning("job %s: could not remove %s: %s", job.id, path.name, exc.strerror or exc)


class _WriteFailed(Exception):
    def __init__(self, error: OSError) -> None:
        super().__init__(f"could not write to the transcript directory: {error.strerror or error}")


def _reset_to_pending(job: Job) -> None:
    job.status, job.stage = JobStatus.PENDING, JobStage.QUEUED
    job.progress, job.processed_seconds, job.eta_seconds = 0.0, 0.0, None


def _built_for_cli_command() -> bool:
    """True when the flask command line made the app for a command other than the server."""
    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.command.name != "run"


def get_service() -> JobService:
    """The current app's job service."""
    service: JobService = current_app.extensions["whisper_flask"]
    return service
