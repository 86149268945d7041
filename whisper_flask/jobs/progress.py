"""A transcribing job's reports: at each window its resume state and figures, between windows the clock's.

The pipeline gives its engine `on_window` as the window hook and `checked(check)` as the step check
(jobs/pipeline.py); the figures themselves are estimated in estimate.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from whisper.audio import FRAMES_PER_SECOND

from whisper_flask.engine.windows import Window
from whisper_flask.exceptions import JobStopped, TransientStorageError
from whisper_flask.jobs.estimate import Estimate
from whisper_flask.jobs.ports import Registry
from whisper_flask.jobs.resume import save_resume

log = logging.getLogger(__name__)

#: Progress reaches the store at most this often per job; state changes always do.
PERSIST_INTERVAL_S = 1.0
#: Between windows the percentage and the ETA follow the clock at most this often (in memory only).
TICK_S = 0.2


class JobInterrupted(JobStopped):
    """The service is stopping; the job goes back to pending and resumes at this window."""


class JobProgress:
    """One running job's progress: its position, percentage and ETA (estimate.py), at each window and between."""

    def __init__(self, registry: Registry, transcript_dir: Path, job_id: str, duration: float) -> None:
        self._registry = registry
        self._transcript_dir = transcript_dir
        self._job_id = job_id
        self._duration = duration
        self._estimate = Estimate(round(duration * FRAMES_PER_SECOND), time.monotonic())
        # Windows (parts' threads, one at a time) and ticks (any part's thread) change the estimate and
        # the record in turn, so a later figure is never overwritten by an earlier one.
        self._lock = threading.Lock()
        self._ticked = 0.0
        self._persisted = 0.0
        self._processed = 0.0
        self._resumable_seek = 0  # the furthest window saved for a resume
        self._resume_refused = False  # the disk was full at the last save (logged once)

    def on_window(self, window: Window) -> None:
        """Record the decoder's position; save the resume state; raise to stop the job here."""
        with self._lock:
            self._on_window(window)
        # Checked after saving: a stopped job resumes at exactly this window.
        if not self._registry.accepting:
            raise JobInterrupted(self._job_id)

    def checked(self, check: Callable[[], None]) -> Callable[[], None]:
        """The job's step check, which also counts the ETA down (and the percentage up) between windows."""

        def check_and_tick() -> None:
            check()
            now = time.monotonic()
            # A window can take seconds: between them the figures follow the clock, at most every TICK_S.
            # A tick never waits for the lock (a window may be saving): the model's step goes first.
            if now - self._ticked >= TICK_S and self._lock.acquire(blocking=False):
                try:
                    self._ticked = now
                    self._registry.update(self._job_id, persist=False, **self._figures(now))
                finally:
                    self._lock.release()

        return check_and_tick

    def _figures(self, now: float) -> dict[str, Any]:
        eta = self._estimate.eta(now)
        return {"progress": self._estimate.progress(now), "eta_seconds": None if eta is None else round(eta, 1)}

    def _on_window(self, window: Window) -> None:
        now = time.monotonic()
        self._estimate.observe(window, now)
        self._processed = round(max(self._processed, min(window.seconds, self._duration)), 3)
        changes: dict[str, Any] = {"processed_seconds": self._processed, **self._figures(now)}
        self._ticked = now
        persist = now - self._persisted >= PERSIST_INTERVAL_S
        if persist:
            self._persisted = now
        # Saved before the progress is shown: a stream that sees the job move on reads these
        # segments. A cancelled job's file goes with its other files when the pipeline ends.
        if window.seek > self._resumable_seek:
            self._resumable_seek = window.seek
            self._save_resume(window)  # WriteFailed: the transcript could not be written either, fail now
        try:
            self._registry.update(self._job_id, persist=persist, **changes)  # JobCancelled stops the job here
        except TransientStorageError:
            # Progress may run ahead of its stored record, as between persists; the status never does.
            self._registry.update(self._job_id, persist=False, **changes)

    def _save_resume(self, window: Window) -> None:
        try:
            save_resume(self._transcript_dir, self._job_id, window)
        except TransientStorageError as exc:
            # Only a crash needs it, and a later window's state holds this one's: transcribing goes
            # on, and the job waits for space when it writes its transcript.
            if not self._resume_refused:
                log.warning("job %s: resume state not saved: %s", self._job_id, exc)
            self._resume_refused = True
        else:
            self._resume_refused = False
