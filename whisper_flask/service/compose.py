"""The composition root: every part of the service, built from Settings in one place (ARCHITECTURE.md, "Rooms")."""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass

from whisper_flask.access.control import AccessControl, FailureThrottle, LinkSigner
from whisper_flask.access.keys import KeyStore
from whisper_flask.audio.fetch import FetchLimits, UrlFetcher
from whisper_flask.audio.media import MediaDecoder
from whisper_flask.engine.engine import Engine
from whisper_flask.exceptions import BrokerUnavailable, DatabaseUnavailable
from whisper_flask.jobs.celery_queue import CeleryRunner, make_celery
from whisper_flask.jobs.database import open_engine
from whisper_flask.jobs.leases import Leases, node_name
from whisper_flask.jobs.pipeline import JobPipeline
from whisper_flask.jobs.ports import JobRunner, JobStore, Registry
from whisper_flask.jobs.records import Job
from whisper_flask.jobs.registry import JobRegistry
from whisper_flask.jobs.retention import Retention
from whisper_flask.jobs.runner import PoolRunner
from whisper_flask.jobs.shared_registry import SharedRegistry
from whisper_flask.jobs.store import SqlJobStore
from whisper_flask.jobs.upkeep import Heartbeat, Reconciler
from whisper_flask.notify.messages import download_links
from whisper_flask.notify.notifier import Notifier
from whisper_flask.service.detection import LanguageDetection
from whisper_flask.service.owned import OwnedJobs
from whisper_flask.service.slots import RequestSlots
from whisper_flask.service.transcripts import TranscriptReader
from whisper_flask.service.waits import JobWaits
from whisper_flask.settings import Settings


class Role(enum.Enum):
    """What this process does: everything (one process), or its part of a cluster (ARCHITECTURE.md, "Cluster")."""

    ALONE = "alone"  # the API and the jobs, SQLite or PostgreSQL
    API = "api"  # accepts, stores and enqueues jobs; loads no model
    WORKER = "worker"  # runs the jobs the broker hands it (whisper_flask/worker.py)

    @property
    def runs_jobs(self) -> bool:
        """Whether this process loads the model and runs jobs."""
        return self is not Role.API

    @property
    def serves(self) -> bool:
        """Whether this process answers HTTP and sends notifications."""
        return self is not Role.WORKER


@dataclass(frozen=True)
class Cluster:
    """A cluster node's own parts: its leases, its link to the broker, and the loops that keep them."""

    role: Role
    node: str  # this process's name in the cluster (leases.node_name)
    leases: Leases
    runner: CeleryRunner
    reconciler: Reconciler
    heartbeat: Heartbeat | None  # workers only

    def start(self) -> None:
        """Start the heartbeat (a worker) and the reconciler."""
        if self.heartbeat is not None:
            self.heartbeat.start()
        self.reconciler.start()

    def check_reachable(self) -> None:
        """Return if the database and the broker answer now; DatabaseUnavailable or BrokerUnavailable otherwise."""
        if not self.leases.reachable():
            raise DatabaseUnavailable("the job database does not answer; this node retries by itself")
        if not self.runner.reachable():
            raise BrokerUnavailable("the broker does not answer; this node retries by itself")

    def stop(self) -> None:
        """Stop the reconciler and the heartbeat."""
        self.reconciler.stop()
        if self.heartbeat is not None:
            self.heartbeat.stop()


@dataclass(frozen=True)
class Parts:
    """What the service is made of; only the face (face.py) and its lifecycle touch these."""

    settings: Settings
    engine: Engine
    store: JobStore
    role: Role
    registry: Registry
    runner: JobRunner
    pipeline: JobPipeline
    access: AccessControl
    keys: KeyStore
    signer: LinkSigner
    retention: Retention
    media: MediaDecoder
    notifier: Notifier
    owned: OwnedJobs
    transcripts: TranscriptReader
    detection: LanguageDetection
    waits: JobWaits
    cluster: Cluster | None


def open_stores(settings: Settings) -> tuple[SqlJobStore, KeyStore]:
    """The job store and the key store on one engine: DATABASE_URL's PostgreSQL, else TRANSCRIPT_DIR's SQLite."""
    database = open_engine(settings.DATABASE_URL or settings.TRANSCRIPT_DIR / "jobs.sqlite3")
    return SqlJobStore(database), KeyStore(database)


def build_parts(settings: Settings, engine: Engine, role: Role = Role.ALONE) -> Parts:
    """Open the stores and build every part; nothing runs until the lifecycle starts it."""
    store, keys = open_stores(settings)
    signer = LinkSigner(settings.TRANSCRIPT_DIR / "link-secret", settings.DOWNLOAD_LINK_TTL_S)
    access = AccessControl(keys, FailureThrottle(settings.AUTH_FAILURES_PER_MINUTE), signer, enabled=settings.AUTH)
    retention = Retention(store, settings)
    media = MediaDecoder(settings.UPLOAD_DIR, settings.MAX_AUDIO_HOURS * 3600)
    registry: Registry
    runner: JobRunner
    cluster = None
    if role is Role.ALONE:
        registry = JobRegistry(store, settings.MAX_QUEUED_JOBS, settings.MAX_JOBS_PER_KEY)
        runner = PoolRunner(settings.MAX_WORKERS)
    else:
        registry, cluster = _cluster_parts(settings, store, role, retention.release)
        runner = cluster.runner
    notifier = Notifier(
        store, settings, signer.webhook_secret, functools.partial(download_links, signer, settings.PUBLIC_URL),
        claim=functools.partial(cluster.leases.claim_notification, node=cluster.node) if cluster else None,
    )  # fmt: skip
    fetcher = UrlFetcher(settings.URL_ALLOW, FetchLimits(settings.max_upload_bytes, settings.URL_FETCH_TIMEOUT_S))
    pipeline = JobPipeline(registry, engine, media, fetcher, retention, settings)
    owned = OwnedJobs(registry, store)
    return Parts(
        settings=settings,
        engine=engine,
        store=store,
        role=role,
        registry=registry,
        runner=runner,
        pipeline=pipeline,
        access=access,
        keys=keys,
        signer=signer,
        retention=retention,
        media=media,
        notifier=notifier,
        owned=owned,
        transcripts=TranscriptReader(owned.view, signer, access.owner_active, settings.TRANSCRIPT_DIR),
        detection=LanguageDetection(
            engine, media, registry, RequestSlots(settings.MAX_DETECTIONS, "language detections")
        ),
        waits=JobWaits(
            registry, owned, RequestSlots(settings.MAX_WAITING_REQUESTS, "requests waiting for their transcripts")
        ),
        cluster=cluster,
    )


def _cluster_parts(
    settings: Settings, store: SqlJobStore, role: Role, release: Callable[[Job], None]
) -> tuple[SharedRegistry, Cluster]:
    """A cluster node's registry and loops, on the store's PostgreSQL database and the broker."""
    leases = Leases(store.engine, settings.LEASE_S)
    node = node_name()
    runner = CeleryRunner(make_celery(settings))
    registry = SharedRegistry(
        store, leases, settings.MAX_QUEUED_JOBS, settings.MAX_JOBS_PER_KEY, node, requeue=runner.submit
    )
    heartbeat = (
        Heartbeat(registry, leases, node, settings.MODEL, settings.MAX_WORKERS, settings.LEASE_S)
        if role.runs_jobs
        else None
    )
    reconciler = Reconciler(store, leases, runner, release, settings.LEASE_S)
    return registry, Cluster(role, node, leases, runner, reconciler, heartbeat)
