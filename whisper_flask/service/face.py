"""The transcription service: wires the store, registry, pipeline, pool and retention, and owns their lifecycle.

Blueprints reach it through get_service(); it answers with records and views, and raises the
service's exceptions (exceptions.py), never HTTP errors.
"""

from __future__ import annotations

import enum
import functools
import logging
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from whisper_flask.access.control import AccessControl, FailureThrottle, LinkSigner, Principal
from whisper_flask.access.keys import KeyStore
from whisper_flask.audio.fetch import FetchLimits, UrlFetcher
from whisper_flask.audio.media import MediaDecoder
from whisper_flask.engine.engine import Engine
from whisper_flask.exceptions import (
    JobExpired,
    JobNotFound,
    ModelLoading,
    ModelNotFound,
    ModelUnavailable,
    NotMultilingual,
    ShuttingDown,
)
from whisper_flask.jobs.pipeline import JobPipeline
from whisper_flask.jobs.records import Job, JobStatus, JobView, Notification, Submission
from whisper_flask.jobs.registry import JobRegistry
from whisper_flask.jobs.retention import Retention
from whisper_flask.jobs.store import JobStore
from whisper_flask.notify.notifier import Notifier, RetryPolicy, download_links, smtp_settings
from whisper_flask.service.slots import RequestSlots
from whisper_flask.service.transcripts import TranscriptReader

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger(__name__)

#: The key of the service in `app.extensions`.
EXTENSION = "whisper_flask"
_JOB_ID = re.compile(r"[0-9a-f]{32}")
#: How often a request waiting for a job looks whether the server is stopping (drain()).
DRAIN_POLL_S = 1.0
#: Other names requests may use for the loaded model: OpenAI's clients send "whisper-1".
MODEL_ALIASES = ("whisper-1",)


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
        self._draining = threading.Event()

    def init_app(self, app: Flask, engine: Engine) -> None:
        """Open the store and build the parts from app.config; nothing runs until start()."""
        config = app.config
        self.engine = engine
        self._config = config
        self.upload_dir: Path = config["UPLOAD_DIR"]
        self.transcript_dir: Path = config["TRANSCRIPT_DIR"]
        self.workers: int = config["MAX_WORKERS"]
        self._store = JobStore(self.transcript_dir / "jobs.sqlite3")
        self.registry = JobRegistry(self._store, config["MAX_QUEUED_JOBS"], config["MAX_JOBS_PER_KEY"])
        self.access = AccessControl(
            KeyStore(self.transcript_dir / "jobs.sqlite3"),
            FailureThrottle(config["AUTH_FAILURES_PER_MINUTE"]),
            LinkSigner(self.transcript_dir / "link-secret", config["DOWNLOAD_LINK_TTL_S"]),
            enabled=config["AUTH"] == "on",
        )
        self.retention = Retention(
            self._store,
            self.upload_dir,
            self.transcript_dir,
            keep_uploads=config["KEEP_UPLOADS"],
            keep_for=timedelta(days=config["RETENTION_DAYS"]),
            expired_keep=timedelta(days=config["EXPIRED_KEEP_DAYS"]),
            sweep_interval_s=config["SWEEP_INTERVAL_S"],
        )
        self.media = MediaDecoder(self.upload_dir, config["MAX_AUDIO_HOURS"] * 3600)
        self.detections = RequestSlots(config["MAX_DETECTIONS"], "language detections")
        self.waits = RequestSlots(config["MAX_WAITING_REQUESTS"], "requests waiting for their transcripts")
        self.notifier = Notifier(
            self._store,
            config["URL_ALLOW"],
            RetryPolicy(config["NOTIFY_RETRY_BASE_S"], config["NOTIFY_MAX_ATTEMPTS"]),
            smtp_settings(config),
            self.access.signer.webhook_secret,
            functools.partial(download_links, self.access.signer),
        )
        limits = FetchLimits(config["MAX_CONTENT_LENGTH"], config["URL_FETCH_TIMEOUT_S"])
        fetcher = UrlFetcher(config["URL_ALLOW"], limits)
        self._pipeline = JobPipeline(
            self.registry, engine, self.media, fetcher, self.retention, self.upload_dir, self.transcript_dir
        )
        self.transcripts = TranscriptReader(self.view, self.access.signer, self.transcript_dir)
        app.extensions[EXTENSION] = self
        # Started by the server (gunicorn's post_worker_init) or by the first request, never by
        # a CLI command that builds the app: `flask models ...` must not load the model or take jobs.
        app.before_request(self._before_request)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Load the model, start the pool and the sweeper, and queue again what a stop left; once."""
        if self._state is not _State.NEW:  # read without the lock: it only ever moves forward
            return
        with self._lifecycle:
            if self._state is not _State.NEW:
                return
            self.access.announce()
            self.engine.start(self._config)
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="whisper-job")
            self.registry.open()
            queued, failed = self.registry.recover()
            for job in failed:
                self.retention.release(job)
            for job_id in queued:
                self._executor.submit(self._pipeline.run, job_id)
            self.retention.start()
            self.notifier.start()
            self._state = _State.RUNNING

    def _before_request(self) -> None:
        if self._state is _State.STOPPED:
            raise ShuttingDown("the service has stopped")
        self.start()

    def stop(self) -> None:
        """Stop taking work; running jobs stop at their next decoder step and go back to pending; close the store."""
        with self._lifecycle:
            if self._state is _State.STOPPED:
                return
            self.registry.close()
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
            if self._state is _State.RUNNING:
                self.notifier.stop()
                self.retention.stop()
                self.engine.stop()
            self._store.close()
            self.access.keys.close()
            self._state = _State.STOPPED

    # -- jobs -----------------------------------------------------------------------------

    def check_capacity(self, principal: Principal) -> None:
        """Raise QueueFull, TooManyJobs or ShuttingDown if no job can be accepted now (before an upload is read)."""
        self.registry.check_capacity(principal.name)

    def submit(self, upload_name: str, request: Submission) -> JobView:
        """Probe a stored upload and queue it as a new job; the upload is the service's from now on."""
        try:
            info = self.media.probe(self.upload_dir / upload_name)  # a playlist or an absurd header ends here
            job = request.job(uuid.uuid4().hex, self.engine.model_name, upload_name=upload_name, duration=info.duration)
            view = self.registry.add(job)
        except BaseException:
            (self.upload_dir / upload_name).unlink(missing_ok=True)
            raise
        log.info("job %s pending: %s from %s (%s)", job.id, request.filename, request.client, info.format_name)
        self._run(job.id)
        return view

    def submit_url(self, url: str, request: Submission) -> JobView:
        """Queue a new job whose audio the pipeline fetches from `url` when it runs."""
        job_id = uuid.uuid4().hex
        job = request.job(job_id, self.engine.model_name, upload_name=f"{job_id}.upload", source_url=url)
        view = self.registry.add(job)
        # Only the host is logged: a URL's path and query may carry a token.
        host = urlsplit(url).hostname
        log.info("job %s pending: %s from %s (a URL on %s)", job_id, request.filename, request.client, host)
        self._run(job_id)
        return view

    def _run(self, job_id: str) -> None:
        assert self._executor is not None  # the registry takes jobs only once started
        try:
            self._executor.submit(self._pipeline.run, job_id)
        except RuntimeError:  # stop() shut the pool after the registry took the job: it is durable
            log.info("job %s will run after the restart", job_id)

    def notifications(self, job_id: str, principal: Principal) -> list[Notification]:
        """The webhook and e-mail of a job, with their delivery state."""
        return self._store.notifications(self.view(job_id, principal).job.id)

    def view(self, job_id: str, principal: Principal) -> JobView:
        """The job as of one moment; JobNotFound for an unknown or malformed id, JobExpired once swept.

        Another key's job is JobNotFound too, with the same message: no key learns which ids exist.
        """
        if not _JOB_ID.fullmatch(job_id):  # checked before any lookup
            raise JobNotFound(f"no job with id {job_id!r}")
        view = self.registry.view(job_id)
        if not principal.owns(view.job.owner):
            raise JobNotFound(f"no job with id {job_id!r}")
        if view.job.expired_at:
            raise JobExpired(f"job {job_id} expired at {view.job.expired_at}; its files were deleted")
        return view

    def views(self, status: JobStatus | None, limit: int, offset: int, principal: Principal) -> list[JobView]:
        """The principal's jobs (an admin's: all) newest first, filtered by status."""
        return self.registry.views(status, None if principal.admin else principal.name, limit, offset)

    def queue_stats(self) -> QueueStats:
        """Pending and running jobs, and the limits."""
        counts = self.registry.counts()
        return QueueStats(counts.pending, counts.in_progress, counts.capacity, self.workers)

    def cancel(self, job_id: str, principal: Principal) -> Job:
        """Cancel a pending or running job (a running one stops at its next decoder step); an ended job is unchanged."""
        self.view(job_id, principal)
        job, was_pending = self.registry.cancel(job_id)
        if was_pending:
            # A pending job owns its upload alone; a running one releases its files when it stops.
            self.retention.release(job)
        return job

    def drain(self) -> None:
        """The server is stopping: requests waiting for jobs answer now (ShuttingDown); jobs run on until stop()."""
        # Called from a signal handler: an Event, no lock. Waits look at it at least every second.
        self._draining.set()

    def wait(self, job_id: str, principal: Principal, timeout: float | None = None) -> Job:
        """The job once it has ended, or as it stands after `timeout` s; ShuttingDown if the service stops first."""
        self.view(job_id, principal)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = DRAIN_POLL_S if deadline is None else min(DRAIN_POLL_S, deadline - time.monotonic())
            if self.registry.wait_until_ended(job_id, max(0.0, left)):
                return self.view(job_id, principal).job
            if self._draining.is_set() or not self.registry.accepting:
                raise ShuttingDown(f"the service is stopping; job {job_id} resumes after the restart")
            if deadline is not None and time.monotonic() >= deadline:
                return self.view(job_id, principal).job

    def model_names(self) -> list[str]:
        """The names a request may give for a model: the aliases, then the loaded model."""
        return [*MODEL_ALIASES, self.engine.model_name]

    def resolve_model(self, name: str) -> str:
        """The loaded model a requested name means; ModelNotFound for a name this service does not serve.

        One model per service today: a request for another model is the seam where choosing
        among several would go.
        """
        if name not in self.model_names():
            raise ModelNotFound(f"the model {name!r} does not exist here; use one of {', '.join(self.model_names())}")
        return self.engine.model_name

    def jobs_per_key(self) -> dict[str | None, int]:
        """How many jobs each key has on record (for `flask keys list`)."""
        return self._store.jobs_per_owner()

    def check_ready(self) -> None:
        """Return once the model is loaded; ModelLoading while it loads, ModelUnavailable if it failed."""
        if self.engine.ready:
            return
        if self.engine.error:  # the reason, with paths, is in the log; /readyz is public
            raise ModelUnavailable(f"model {self.engine.model_name} could not be loaded; the service's log says why")
        raise ModelLoading(f"model {self.engine.model_name} is loading")

    def detect_language(self, upload_name: str) -> dict[str, float]:
        """Language probabilities of the first 30 s of a stored upload, which is then deleted; bounded in number."""
        path = self.upload_dir / upload_name
        try:
            if not self.engine.is_multilingual:
                raise NotMultilingual(f"the loaded model {self.engine.model_name} is English-only")
            with self.detections.held():
                info = self.media.probe(path, self._check_running)
                with self.media.decode(path, self._check_running, info.duration, first_seconds=30) as audio:
                    return self.engine.detect_language(audio)
        finally:
            path.unlink(missing_ok=True)

    def _check_running(self) -> None:
        if not self.registry.accepting:
            raise ShuttingDown("the service is stopping")
