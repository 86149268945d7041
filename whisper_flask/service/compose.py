"""The composition root: every part of the service, built from Settings in one place (ARCHITECTURE.md, "Rooms")."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from whisper_flask.access.control import AccessControl, FailureThrottle, LinkSigner
from whisper_flask.access.keys import KeyStore
from whisper_flask.audio.fetch import FetchLimits, UrlFetcher
from whisper_flask.audio.media import MediaDecoder
from whisper_flask.engine.engine import Engine
from whisper_flask.jobs.database import open_engine
from whisper_flask.jobs.pipeline import JobPipeline
from whisper_flask.jobs.ports import JobRunner, JobStore
from whisper_flask.jobs.registry import JobRegistry
from whisper_flask.jobs.retention import Retention
from whisper_flask.jobs.runner import PoolRunner
from whisper_flask.jobs.store import SqlJobStore
from whisper_flask.notify.messages import download_links
from whisper_flask.notify.notifier import Notifier
from whisper_flask.service.detection import LanguageDetection
from whisper_flask.service.owned import OwnedJobs
from whisper_flask.service.slots import RequestSlots
from whisper_flask.service.transcripts import TranscriptReader
from whisper_flask.service.waits import JobWaits
from whisper_flask.settings import Settings


@dataclass(frozen=True)
class Parts:
    """What the service is made of; only the face (face.py) and its lifecycle touch these."""

    settings: Settings
    engine: Engine
    store: JobStore
    registry: JobRegistry
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


def open_stores(settings: Settings) -> tuple[SqlJobStore, KeyStore]:
    """The job store and the key store on one engine: DATABASE_URL's PostgreSQL, else TRANSCRIPT_DIR's SQLite."""
    database = open_engine(settings.DATABASE_URL or settings.TRANSCRIPT_DIR / "jobs.sqlite3")
    return SqlJobStore(database), KeyStore(database)


def build_parts(settings: Settings, engine: Engine) -> Parts:
    """Open the stores and build every part; nothing runs until the lifecycle starts it."""
    store, keys = open_stores(settings)
    registry = JobRegistry(store, settings.MAX_QUEUED_JOBS, settings.MAX_JOBS_PER_KEY)
    signer = LinkSigner(settings.TRANSCRIPT_DIR / "link-secret", settings.DOWNLOAD_LINK_TTL_S)
    access = AccessControl(keys, FailureThrottle(settings.AUTH_FAILURES_PER_MINUTE), signer, enabled=settings.AUTH)
    retention = Retention(store, settings)
    media = MediaDecoder(settings.UPLOAD_DIR, settings.MAX_AUDIO_HOURS * 3600)
    notifier = Notifier(
        store, settings, signer.webhook_secret, functools.partial(download_links, signer, settings.PUBLIC_URL)
    )
    fetcher = UrlFetcher(settings.URL_ALLOW, FetchLimits(settings.max_upload_bytes, settings.URL_FETCH_TIMEOUT_S))
    pipeline = JobPipeline(registry, engine, media, fetcher, retention, settings)
    owned = OwnedJobs(registry, store)
    return Parts(
        settings=settings,
        engine=engine,
        store=store,
        registry=registry,
        runner=PoolRunner(settings.MAX_WORKERS),
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
    )
