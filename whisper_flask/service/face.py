"""The service's face: the one object blueprints and CLI commands call (ARCHITECTURE.md, "Rooms").

It answers with records and views and raises the service's exceptions (exceptions.py), never HTTP
errors. Its parts are built by compose.build_parts and started and stopped by lifecycle.Lifecycle;
no caller reaches them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from whisper_flask.access.control import Principal
from whisper_flask.access.keys import ApiKey
from whisper_flask.engine.engine import Engine
from whisper_flask.exceptions import ModelLoading, ModelNotFound, ModelUnavailable
from whisper_flask.jobs.leases import WorkerRecord
from whisper_flask.jobs.records import Job, JobStatus, JobView, Notification, Submission
from whisper_flask.service.compose import Parts, Role, build_parts
from whisper_flask.service.lifecycle import Lifecycle
from whisper_flask.service.live import LiveRequest, LiveSession, LiveSessions
from whisper_flask.service.speaker_samples import store_samples
from whisper_flask.settings import Settings

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger(__name__)

#: The key of the service in `app.extensions`.
EXTENSION = "whisper_flask"
#: Other names requests may use for the loaded model: OpenAI's clients send "whisper-1".
MODEL_ALIASES = ("whisper-1",)
#: How long a live token (for browsers, which cannot set a WebSocket's headers) opens sessions.
LIVE_TOKEN_TTL_S = 60
#: A model name with this ending asks for speakers (OpenAI's diarizing model is gpt-4o-transcribe-diarize).
DIARIZE_SUFFIX = "-diarize"


@dataclass(frozen=True)
class QueueStats:
    """Pending and running jobs, and the limits."""

    pending: int
    in_progress: int
    capacity: int
    workers: int
    arithmetic: dict[str, str]  # what each model runs in (engine.arithmetic); empty on a cluster's API node
    # A cluster's workers, by their heartbeats: shown to admin keys (None to others); empty in one process.
    worker_nodes: list[WorkerRecord] | None


class TranscriptionService:
    """Accepts jobs, runs them through the engine, and answers for their state; created unbound, then init_app."""

    def init_app(self, app: Flask, settings: Settings, engine: Engine) -> None:
        """Build the parts from `settings` (the store opens); nothing runs until start()."""
        self.build(settings, engine, Role.API if settings.BROKER_URL else Role.ALONE)
        app.extensions[EXTENSION] = self
        # Started by the server (gunicorn's post_worker_init) or by the first request, never by
        # a CLI command that builds the app: `flask models ...` must not load the model or take jobs.
        app.before_request(self._lifecycle.ensure_started)

    def build(self, settings: Settings, engine: Engine, role: Role) -> None:
        """Build the parts for `role` without an app (a cluster worker, whisper_flask/worker.py); nothing runs yet."""
        self.settings = settings
        self._parts = build_parts(settings, engine, role)
        # Here, not in build_parts: a saved session becomes a job through submit() below, as an upload does.
        self._live = LiveSessions(engine, settings.MAX_LIVE_SESSIONS, settings.UPLOAD_DIR, self._submit_once)
        # Only one process serves live sessions (a cluster's API nodes refuse them), so only it finds recordings.
        self._lifecycle = Lifecycle(self._parts, self._live.recover if role is Role.ALONE else None)

    @property
    def parts(self) -> Parts:
        """The parts, for tests and benchmarks that look inside; views and commands use the methods below."""
        return self._parts

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Load the model, start the pool and the sweeper, and queue again what a stop left; once."""
        self._lifecycle.start()

    def stop(self) -> None:
        """Stop taking work; running jobs stop at their next decoder step and go back to pending; close the store."""
        self._live.stop()
        self._lifecycle.stop()

    def stop_jobs(self) -> None:
        """Stop starting jobs; running ones stop at their next decoder step and go back to pending."""
        self._lifecycle.stop_jobs()

    def run_ticket(self, ticket: str) -> None:
        """Run the pending job whose turn it is to its end (a cluster worker's task; the ticket names who asked)."""
        self._parts.pipeline.run(ticket)

    def drain(self) -> None:
        """The server is stopping: requests waiting for jobs answer now (ShuttingDown), live sessions end; jobs run
        on until stop()."""
        self._parts.waits.drain()
        self._live.stop()

    # -- live sessions --------------------------------------------------------------------

    def open_live(self, request: LiveRequest) -> LiveSession:
        """A live session (service/live.py); Busy past MAX_LIVE_SESSIONS, ModelUnavailable on a cluster's API node."""
        if not self._parts.role.runs_jobs:
            raise ModelUnavailable("live transcription needs the model, which a cluster's API node does not load")
        return self._live.open(request)

    def live_token(self, principal: Principal) -> str:
        """A short-lived token that opens live sessions as `principal` (LIVE_TOKEN_TTL_S)."""
        return self._parts.signer.live_token(principal, LIVE_TOKEN_TTL_S)

    def authenticate_token(self, token: str, address: str) -> Principal:
        """Who a live token stands for; Unauthenticated if it is not genuine, has expired or its key was revoked."""
        return self._parts.access.authenticate_token(token, address)

    # -- access ---------------------------------------------------------------------------

    def authenticate(self, secret: str | None, address: str) -> Principal:
        """The principal of a request's key; Unauthenticated or TooManyFailures otherwise."""
        return self._parts.access.authenticate(secret, address)

    def sign_link(self, job_id: str, fmt: str) -> dict[str, str]:
        """The query parameters of a signed link that opens this transcript without a key until it expires."""
        return self._parts.signer.sign(job_id, fmt)

    def webhook_secret(self, principal: Principal) -> str:
        """The secret that signs the webhooks of this principal's jobs."""
        return self._parts.signer.webhook_secret(principal.name)

    def create_key(self, name: str, *, admin: bool) -> str:
        """Make a key and return its secret, the only time it is available."""
        return self._parts.keys.create(name, admin=admin)

    def ensure_first_key(self) -> str | None:
        """On a first start (auth on, no key ever made), make an admin key and return its secret (else None)."""
        return self._parts.access.ensure_first_key()

    def locked_out(self) -> bool:
        """Whether keys are needed and every key made so far is revoked."""
        return self._parts.access.locked_out()

    def keys(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        return self._parts.keys.keys()

    def revoke_key(self, name: str) -> None:
        """Stop a key from working, at once."""
        self._parts.keys.revoke(name)

    def jobs_per_key(self) -> dict[str | None, int]:
        """How many jobs each key has on record (for `flask keys list`)."""
        return self._parts.store.jobs_per_owner()

    # -- jobs -----------------------------------------------------------------------------

    @property
    def is_multilingual(self) -> bool:
        """Whether the loaded model takes languages other than English (and translates)."""
        return self._parts.engine.is_multilingual

    @property
    def sends_email(self) -> bool:
        """Whether SMTP is configured, so that jobs may ask for an e-mail."""
        return self._parts.notifier.sends_email

    def check_capacity(self, principal: Principal) -> None:
        """Raise QueueFull, TooManyJobs or ShuttingDown if no job can be accepted now (before an upload is read)."""
        self._parts.registry.check_capacity(principal.name)

    def submit(
        self, upload_name: str, request: Submission, speaker_samples: Sequence[bytes] = (), job_id: str | None = None
    ) -> JobView:
        """Probe a stored upload and queue it as a new job; the upload is the service's from now on.

        `speaker_samples` are the voices of `request.options.known_speakers`, in order (speaker_samples.py); `job_id`
        is the id a saved live session's recording gives its job (service/live.py), else a new one.
        """
        stored = [upload_name]
        try:
            info = self._parts.media.probe(self.settings.UPLOAD_DIR / upload_name)  # a playlist or an absurd header
            job = request.job(
                job_id or uuid.uuid4().hex, self.model_name, upload_name=upload_name, duration=info.duration
            )
            store_samples(self._parts.media, self.settings.UPLOAD_DIR, job.speaker_samples, speaker_samples)
            stored += job.speaker_samples
            with self._parts.notifier.reserve(request.owner, request.notify.count):
                view = self._parts.registry.add(job)
        except BaseException:
            for name in stored:
                (self.settings.UPLOAD_DIR / name).unlink(missing_ok=True)
            raise
        log.info("job %s pending: %s from %s (%s)", job.id, request.filename, request.client, info.format_name)
        self._parts.runner.submit(job.id)
        return view

    def _submit_once(self, upload_name: str, request: Submission, job_id: str) -> JobView:
        """submit() as the job `job_id`, or that job if it exists already (its upload then is not needed)."""
        known = self._parts.store.get(job_id)
        if known is not None:
            (self.settings.UPLOAD_DIR / upload_name).unlink(missing_ok=True)
            return JobView(known)
        return self.submit(upload_name, request, job_id=job_id)

    def submit_url(self, url: str, request: Submission) -> JobView:
        """Queue a new job whose audio the pipeline fetches from `url` when it runs."""
        job_id = uuid.uuid4().hex
        job = request.job(job_id, self.model_name, upload_name=f"{job_id}.upload", source_url=url)
        with self._parts.notifier.reserve(request.owner, request.notify.count):  # TooManyNotifications
            view = self._parts.registry.add(job)
        # Only the host is logged: a URL's path and query may carry a token.
        log.info("job %s pending: %s from %s (a URL on %s)", job_id, request.filename, request.client,
                 urlsplit(url).hostname)  # fmt: skip
        self._parts.runner.submit(job_id)
        return view

    def view(self, job_id: str, principal: Principal) -> JobView:
        """The job as of one moment; JobNotFound for an unknown, malformed or foreign id, JobExpired once swept."""
        return self._parts.owned.view(job_id, principal)

    def views(self, status: JobStatus | None, limit: int, offset: int, principal: Principal) -> list[JobView]:
        """The principal's jobs (an admin's: all) newest first, filtered by status."""
        return self._parts.owned.views(status, limit, offset, principal)

    def view_with_notifications(self, job_id: str, principal: Principal) -> tuple[JobView, list[Notification]]:
        """The job as of one moment, with its webhook and e-mail and their delivery state."""
        view = self.view(job_id, principal)
        return view, self._parts.store.notifications(view.job.id)

    def queue_stats(self, principal: Principal) -> QueueStats:
        """Pending and running jobs, and the limits; a cluster's workers for admin keys only (their hosts)."""
        counts = self._parts.registry.counts()
        cluster = self._parts.cluster
        workers = None if cluster and not principal.admin else cluster.leases.workers() if cluster else []
        return QueueStats(
            counts.pending, counts.in_progress, counts.capacity, self.settings.MAX_WORKERS,
            self._parts.engine.arithmetic() if self._parts.role.runs_jobs else {}, workers,
        )  # fmt: skip

    def cancel(self, job_id: str, principal: Principal) -> Job:
        """Cancel a pending or running job (a running one stops at its next decoder step); delete an ended one.

        Either way its audio, transcripts and resume state go. An ended job is marked expired, so
        its links and downloads answer JobExpired; deleting it again returns its record.
        """
        job = self._parts.owned.view(job_id, principal, expired_ok=True).job
        if job.expired_at:
            return job
        if not job.status.terminal:
            job, was_pending = self._parts.registry.cancel(job_id)
            if was_pending:
                # A pending job owns its upload alone; a running one releases its files when it stops.
                self._parts.retention.release(job)
            if job.status is JobStatus.CANCELLED:
                return job
        # Ended before, or while, it was asked: people ask for their recordings to be gone.
        return self._parts.retention.delete(job)

    def wait(self, job_id: str, principal: Principal, timeout: float | None = None) -> Job:
        """The job once it has ended, or as it stands after `timeout` s; ShuttingDown if the service stops first."""
        return self._parts.waits.wait(job_id, principal, timeout)

    def hold_wait_slot(self) -> Callable[[], None]:
        """Take one of MAX_WAITING_REQUESTS places (Busy if none is free); call what it returns to give it back."""
        return self._parts.waits.hold_slot()

    # -- transcripts ----------------------------------------------------------------------

    def transcript(self, job_id: str, fmt: str, principal: Principal) -> tuple[Job, Path]:
        """A completed job and the path of its transcript in `fmt`."""
        return self._parts.transcripts.path(job_id, fmt, principal)

    def transcript_by_link(self, job_id: str, fmt: str, expires: str, signature: str) -> tuple[Job, Path]:
        """A transcript opened by a signed link instead of a key; LinkRefused (or a subclass) if not valid."""
        return self._parts.transcripts.path_by_link(job_id, fmt, expires, signature)

    def segments_so_far(self, job_id: str, principal: Principal) -> list[dict[str, Any]]:
        """The segments of a running job's finished windows; empty before its first."""
        return self._parts.transcripts.segments_so_far(job_id, principal)

    def result(self, job_id: str, principal: Principal) -> dict[str, Any]:
        """A completed job's whole result: text, segments and language, as Whisper gave them."""
        return self._parts.transcripts.result(job_id, principal)

    # -- the model ------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """The model jobs run on: the engine's, or on a cluster's API node (which loads none) the setting's."""
        return self._parts.engine.model_name or self.settings.MODEL

    def model_names(self) -> list[str]:
        """The names a request may give for a model: the aliases, the loaded model, and each with DIARIZE_SUFFIX."""
        names = [*MODEL_ALIASES, self.model_name]
        return [*names, "gpt-4o-transcribe" + DIARIZE_SUFFIX, *(name + DIARIZE_SUFFIX for name in names)]

    def resolve_model(self, name: str) -> str:
        """The loaded model a requested name means; ModelNotFound for a name this service does not serve."""
        # One model per service today: this is the seam where choosing among several would go.
        if name not in self.model_names():
            raise ModelNotFound(f"the model {name!r} does not exist here; use one of {', '.join(self.model_names())}")
        return self.model_name

    def check_ready(self) -> None:
        """Return once the model is loaded (an API node: the database and the broker answer); else why not."""
        if self._parts.cluster is not None and not self._parts.role.runs_jobs:
            self._parts.cluster.check_reachable()
            return
        if self._parts.engine.ready:
            return
        if self._parts.engine.error:  # the reason, with paths, is in the log; /readyz is public
            raise ModelUnavailable(f"model {self.model_name} could not be loaded; the service's log says why")
        raise ModelLoading(f"model {self.model_name} is loading")

    def detect_language(self, upload_name: str) -> dict[str, float]:
        """Language probabilities of the first 30 s of a stored upload, which is then deleted; bounded in number."""
        if not self._parts.role.runs_jobs:
            (self.settings.UPLOAD_DIR / upload_name).unlink(missing_ok=True)
            raise ModelUnavailable("a cluster's API node loads no model: submit a job, whose result names its language")
        return self._parts.detection.detect(self.settings.UPLOAD_DIR / upload_name)
