"""What happens to a job's files: released when it ends, expired by a periodic sweep."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from datetime import datetime, timedelta, timezone

from whisper_flask.jobs.ports import JobStore
from whisper_flask.jobs.records import Job, JobStatus, iso, utcnow
from whisper_flask.jobs.resume import diarization_path, resume_path, transcribed_path
from whisper_flask.jobs.writers import FORMATS, transcript_path
from whisper_flask.settings import Settings

log = logging.getLogger(__name__)

#: Prefix of a partial upload's name, where the filesystem cannot make unnamed files (api/uploads.py).
INCOMING_PREFIX = ".incoming-"
#: A partial upload nobody has written to for this long was left by a killed process.
INCOMING_IDLE_S = 60.0


class Retention:
    """Deletes ended jobs' files: audio and resume state at once, transcripts when they expire."""

    def __init__(self, store: JobStore, settings: Settings) -> None:
        self._store = store
        self._upload_dir = settings.UPLOAD_DIR
        self._transcript_dir = settings.TRANSCRIPT_DIR
        self._keep_uploads = settings.KEEP_UPLOADS
        self._keep_for = timedelta(days=settings.RETENTION_DAYS)
        self._expired_keep = timedelta(days=settings.EXPIRED_KEEP_DAYS)
        self._interval = settings.SWEEP_INTERVAL_S
        self._stopping = threading.Event()
        self._sweeper: threading.Thread | None = None

    def start(self) -> None:
        """Remove what a killed process left, then sweep every SWEEP_INTERVAL_S on a thread of its own until stop()."""
        self.remove_partial_uploads()
        self._sweeper = threading.Thread(target=self._sweep_periodically, name="whisper-sweep", daemon=True)
        self._sweeper.start()

    def stop(self) -> None:
        """Stop the sweeper and wait for it (a sweep under way finishes first)."""
        self._stopping.set()
        if self._sweeper is not None:
            self._sweeper.join()

    def release(self, job: Job) -> None:
        """Delete what an ended job no longer needs: a cancelled job's everything, else its audio and resume state."""
        cancelled = job.status is JobStatus.CANCELLED
        self._delete(job, transcripts=cancelled, upload=cancelled or not self._keep_uploads)

    def delete(self, job: Job) -> Job:
        """Delete an ended job's every file (on its owner's request) and mark it expired; its record as now stored."""
        # Marked first: if the mark is refused (a full disk), the files stay and the job stays as it was.
        moment = utcnow()
        self._store.mark_expired(job.id, moment)
        self._delete(job, transcripts=True, upload=True)
        log.info("job %s deleted", job.id)
        return dataclasses.replace(job, expired_at=moment)

    def sweep(self) -> None:
        """Delete the files of jobs that ended RETENTION_DAYS ago, and forget ids expired long enough."""
        now = datetime.now(timezone.utc)
        for job in self._store.finished_before(iso(now - self._keep_for)):
            self._delete(job, transcripts=True, upload=True)
            self._store.mark_expired(job.id, iso(now))
            log.info("job %s expired", job.id)
        forgotten = self._store.forget_expired_before(iso(now - self._expired_keep))
        if forgotten:
            log.info("forgot %d expired jobs", forgotten)
        self.remove_partial_uploads()

    def remove_partial_uploads(self) -> None:
        """Delete partial uploads not written to for INCOMING_IDLE_S; one still streaming is kept."""
        idle_since = time.time() - INCOMING_IDLE_S
        for path in self._upload_dir.glob(f"{INCOMING_PREFIX}*"):
            try:
                if path.stat().st_mtime < idle_since:
                    path.unlink()
                    log.info("removed a partial upload left by a killed process")
            except OSError:  # its request ended meanwhile and removed it
                continue

    def _sweep_periodically(self) -> None:
        while not self._stopping.wait(self._interval):
            try:
                self.sweep()
            except Exception:  # the next sweep tries again; the service must not lose its sweeper
                log.exception("retention sweep failed")

    def _delete(self, job: Job, *, transcripts: bool, upload: bool) -> None:
        """Remove a job's resume state, and its transcripts and audio if asked; file by file."""
        kept = (resume_path, diarization_path, transcribed_path)
        paths = [path(self._transcript_dir, job.id) for path in kept]
        if transcripts:
            paths += [transcript_path(self._transcript_dir, job.id, fmt) for fmt in FORMATS]
        if upload:
            paths += [self._upload_dir / name for name in [job.upload_name, *job.speaker_samples]]
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:  # a read-only directory must not stop the rest, nor the worker
                log.warning("job %s: could not remove %s: %s", job.id, path.name, exc.strerror or exc)
