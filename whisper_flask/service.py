"""The transcription service: wires the store, registry, pipeline, pool and retention, and owns their lifecycle.

Blueprints reach it through get_service(); it answers with records and views, and raises the
service's exceptions (exceptions.py), never HTTP errors.
"""

from __future__ import annotations

import enum
import logging
import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from flask import Flask, current_app

from .audio import decode_audio
from .engine import Engine
from .exceptions import (
    JobExpired,
    JobNotFound,
    ModelLoading,
    ModelUnavailable,
    NotMultilingual,
    NoTranscript,
    TranscriptMissing,
    TranscriptNotReady,
    UnknownFormat,
)
from .options import TranscribeOptions
from .pipeline import JobPipeline
from .records import Job, JobStatus, JobView
from .registry import JobRegistry
from .retention import Retention
from .store import JobStore
from .writers import FORMATS, transcript_path

log = logging.getLogger(__name__)

_EXTENSION = "whisper_flask"
_JOB_ID = re.compile(r"[0-9a-f]{32}")


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


@dataclass(frozen=True)
class QueueStats:
    """Pending and running jobs, and the limits."""

    pending: int
    in_progress: int
    capacity: int
    workers: int


class TranscriptionService:
    """Accepts jobs, runs them on a bounded pool through the engine, and answers for their state."""

    def __init__(self) -> None:
        self._lifecycle = threading.Lock()
        self._state = _State.NEW
        self._executor: ThreadPoolExecutor | None = None

    def init_app(self, app: Flask, engine: Engine) -> None:
        """Open the store and build the parts from app.config; nothing runs until start()."""
        config = app.config
        self.engine = engine
        self._config = config
        self.upload_dir: Path = config["UPLOAD_DIR"]
        self.transcript_dir: Path = config["TRANSCRIPT_DIR"]
        self.workers: int = config["MAX_WORKERS"]
        self._store = JobStore(self.transcript_dir / "jobs.sqlite3")
        self.registry = JobRegistry(self._store, config["MAX_QUEUED_JOBS"])
        self.retention = Retention(
            self._store,
            self.upload_dir,
            self.transcript_dir,
            keep_uploads=config["KEEP_UPLOADS"],
            keep_for=timedelta(days=config["RETENTION_DAYS"]),
            expired_keep=timedelta(days=config["EXPIRED_KEEP_DAYS"]),
            sweep_interval_s=config["SWEEP_INTERVAL_S"],
        )
        self._pipeline = JobPipeline(self.registry, engine, self.retention, self.upload_dir, self.transcript_dir)
        app.extensions[_EXTENSION] = self
        # Started by the server (gunicorn's post_worker_init) or by the first request, never by
        # a CLI command that builds the app: `flask models ...` must not load the model or take jobs.
        app.before_request(self.start)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Load the model, start the pool and the sweeper, and queue again what a stop left; once."""
        if self._state is not _State.NEW:  # read without the lock: it only ever moves forward
            return
        with self._lifecycle:
            if self._state is not _State.NEW:
                return
            self.engine.start(self._config)
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="whisper-job")
            self.registry.open()
            for job_id in self.registry.recover():
                self._executor.submit(self._pipeline.run, job_id)
            self.retention.start()
            self._state = _State.RUNNING

    def stop(self) -> None:
        """Stop taking work; running jobs stop at their next window and go back to pending; close the store."""
        with self._lifecycle:
            if self._state is _State.STOPPED:
                return
            self.registry.close()
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
            if self._state is _State.RUNNING:
                self.retention.stop()
                self.engine.stop()
            self._store.close()
            self._state = _State.STOPPED

    # -- jobs -----------------------------------------------------------------------------

    def check_capacity(self) -> None:
        """Raise QueueFull or ShuttingDown if no job can be accepted now (before an upload's body is read)."""
        self.registry.check_capacity()

    def submit(self, upload_name: str, filename: str, options: TranscribeOptions, client: str | None) -> JobView:
        """Queue a stored upload as a new job; the upload belongs to the service from now on."""
        job = Job(id=uuid.uuid4().hex, filename=filename, upload_name=upload_name, options=options,
                  model=self.engine.model_name)  # fmt: skip
        try:
            view = self.registry.add(job)
        except BaseException:
            (self.upload_dir / upload_name).unlink(missing_ok=True)
            raise
        assert self._executor is not None  # the registry takes jobs only once started
        log.info("job %s pending: %s from %s", job.id, filename, client)
        try:
            self._executor.submit(self._pipeline.run, job.id)
        except RuntimeError:  # stop() shut the pool after the registry took the job: it is durable
            log.info("job %s will run after the restart", job.id)
        return view

    def view(self, job_id: str) -> JobView:
        """The job as of one moment; JobNotFound for an unknown or malformed id, JobExpired once swept."""
        if not _JOB_ID.fullmatch(job_id):  # checked before any lookup
            raise JobNotFound(f"no job with id {job_id!r}")
        view = self.registry.view(job_id)
        if view.job.expired_at:
            raise JobExpired(f"job {job_id} expired at {view.job.expired_at}; its files were deleted")
        return view

    def views(self, status: JobStatus | None, limit: int, offset: int) -> list[JobView]:
        """Jobs newest first, filtered by status."""
        return self.registry.views(status, limit, offset)

    def queue_stats(self) -> QueueStats:
        """Pending and running jobs, and the limits."""
        counts = self.registry.counts()
        return QueueStats(counts.pending, counts.in_progress, counts.capacity, self.workers)

    def cancel(self, job_id: str) -> Job:
        """Cancel a pending or running job (a running one stops at its next window); an ended job is unchanged."""
        self.view(job_id)
        job, was_pending = self.registry.cancel(job_id)
        if was_pending:
            # A pending job owns its upload alone; a running one releases its files when it stops.
            self.retention.release(job)
        return job

    def transcript(self, job_id: str, fmt: str) -> tuple[Job, Path]:
        """A completed job and the path of its transcript in `fmt`."""
        job = self.view(job_id).job
        if fmt not in FORMATS:
            raise UnknownFormat(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
        if not job.status.terminal:
            raise TranscriptNotReady("the transcript is not ready yet", job.status.value, job.progress)
        if job.status is not JobStatus.COMPLETED:
            raise NoTranscript(f"the job is {job.status.value}; it has no transcript", job.status.value)
        # Built from the registry's id and a known format, never from the URL's text.
        path = transcript_path(self.transcript_dir, job.id, fmt)
        if not path.is_file():
            raise TranscriptMissing("the transcript file is gone")
        return job, path

    def check_ready(self) -> None:
        """Return once the model is loaded; ModelLoading while it loads, ModelUnavailable if it failed."""
        if self.engine.ready:
            return
        if self.engine.error:
            raise ModelUnavailable(self.engine.error)
        raise ModelLoading(f"model {self.engine.model_name} is loading")

    def detect_language(self, path: Path) -> dict[str, float]:
        """Language probabilities of the first 30 seconds of an audio file."""
        if not self.engine.is_multilingual:
            raise NotMultilingual(f"the loaded model {self.engine.model_name} is English-only")
        return self.engine.detect_language(decode_audio(path, max_seconds=30))


def get_service(app: Flask | None = None) -> TranscriptionService:
    """The service of `app`, or of the current app."""
    service: TranscriptionService = (app or current_app).extensions[_EXTENSION]
    return service
