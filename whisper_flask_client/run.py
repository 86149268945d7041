"""One input's way through the service: find or upload its job, follow it, write its transcripts.

Nothing is lost on Ctrl-C or a dropped connection: a job id is in the state file before anything else
is done with it, so the same command run again collects the job instead of uploading again.
The one window is between sending an upload and its 202: the entry then says `uploading_since`, and a
later run (or this one, after a connection error) looks for a job of this key with the input's name
created since, before it uploads again.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import requests

from whisper_flask_client.api import Client, Job, JobState, Options
from whisper_flask_client.errors import Expired, JobNotFound, RetryLater, ServiceError
from whisper_flask_client.files import write_atomic
from whisper_flask_client.state import StateFile

#: How far the service's clock may be behind ours when a job is matched to an upload whose answer was lost.
CLOCK_SKEW_S = 300
#: Seconds between upload attempts after a connection error: doubling, at most the second, this many tries.
UPLOAD_BACKOFF = (1.0, 30.0, 6)


class Interrupted(Exception):
    """The run was told to stop (Ctrl-C); what was submitted stays recorded."""


@dataclass(frozen=True)
class Item:
    """One input: a file or a URL, where its transcripts go, and its key in the state file."""

    source: str
    is_url: bool
    outputs: dict[str, Path]
    key: str

    @property
    def name(self) -> str:
        """The name the service is given (and shows) for the input."""
        return source_name(self.source, self.is_url)


def source_name(source: str, is_url: bool) -> str:
    """An input's file name: a URL's last path segment (query dropped), else the file's own name."""
    if is_url:
        return source.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "audio"
    return Path(source).name


@dataclass
class Result:
    """What became of one input; one JSON line with --json."""

    input: str
    status: str  # completed, skipped, failed, cancelled, interrupted
    job_id: str | None = None
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    code: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The result as a JSON object."""
        return {key: value for key, value in self.__dict__.items() if value is not None}


class Tracker(Protocol):
    """Where one input's progress is shown."""

    def upload(self, total: int) -> None:
        """An upload of `total` bytes starts."""

    def sent(self, count: int) -> None:
        """`count` more bytes were sent."""

    def job(self, state: JobState) -> None:
        """The job's state now."""

    def note(self, text: str) -> None:
        """A word on what it waits for."""


class Runner:
    """Takes inputs through the service, several at once, sharing one stop signal and one state file."""

    def __init__(self, client: Client, state: StateFile, options: Options, stop: threading.Event) -> None:
        self.client = client
        self.state = state
        self.options = options
        self.stop = stop
        client.stop = stop  # a read's connection retries end at Ctrl-C too, not after their backoff
        # Notified when a job of this run ends: an upload refused for this key's share can go then.
        self.room = threading.Condition()

    def interrupt(self) -> None:
        """Stop every input at its next step: uploads abort, waits return; recorded jobs stay recorded."""
        self.stop.set()
        with self.room:
            self.room.notify_all()

    def run(self, item: Item, tracker: Tracker) -> Result:
        """Find or upload the input's job, wait for it, write its transcripts."""
        try:
            job = self._existing(item) or self._upload(item, tracker)
            return self._collect(item, job, tracker)
        except Interrupted:
            return Result(item.source, "interrupted", error="run the same command again to collect it")
        except ServiceError as error:
            return Result(item.source, "failed", error=error.message, code=error.code)
        except requests.RequestException as error:  # the entry stays: the next run collects the job
            if self.stop.is_set():  # the client gave up retrying because of the stop
                return Result(item.source, "interrupted", error="run the same command again to collect it")
            return Result(item.source, "failed", error=f"connection failed: {error}", code="connection_error")

    def cancel(self, item: Item) -> Result:
        """Cancel the input's recorded job on the service and forget it."""
        job = self._existing(item)  # None when no entry: one read of the state file, under its lock
        if job is None:
            return Result(item.source, "skipped", error="no job recorded for this input")
        try:
            job.cancel()
        except (JobNotFound, Expired):
            pass  # gone already: nothing left to cancel
        self.state.remove(item.key)
        return Result(item.source, "cancelled", job_id=job.id)

    def _existing(self, item: Item) -> Job | None:
        entry = self.state.get(item.key)
        if not entry:
            return None
        if entry.get("job_id"):
            job = self.client.job(str(entry["job_id"]))
            try:
                job.state()
            except (JobNotFound, Expired):  # forgotten by the service: this input starts again
                self.state.remove(item.key)
                return None
            return job
        return self._reconcile(item, float(entry.get("uploading_since", 0)))

    def _reconcile(self, item: Item, since: float) -> Job | None:
        """The job an upload whose answer was lost made, if the service has one; it is recorded then."""
        known = self.state.job_ids()
        for record in reversed(self.client.jobs()):  # oldest first: the first upload is the one to keep
            same = record.get("source_url") == item.source if item.is_url else record.get("filename") == item.name
            created = datetime.fromisoformat(str(record["created_at"]).replace("Z", "+00:00")).timestamp()
            if same and created >= since - CLOCK_SKEW_S and record["transcription_id"] not in known:
                self.state.put(item.key, {"job_id": record["transcription_id"]})
                return self.client.job(record["transcription_id"])
        self.state.remove(item.key)
        return None

    def _upload(self, item: Item, tracker: Tracker) -> Job:
        delay, most, tries = UPLOAD_BACKOFF
        failures = 0
        while True:
            if self.stop.is_set():
                raise Interrupted
            since = time.time()
            self.state.put(item.key, {"uploading_since": since})  # _reconcile matches by the item's own name
            try:
                job = self._send(item, tracker)
            except RetryLater as error:  # refused before anything was kept
                self.state.remove(item.key)
                self._wait_for_room(error.retry_after or 5, tracker, error.message)
                continue
            except ServiceError:
                self.state.remove(item.key)
                raise
            except requests.RequestException:
                failures += 1
                if failures >= tries:
                    raise
                tracker.note("connection lost; retrying")
                if self.stop.wait(min(most, delay * 2 ** (failures - 1))):
                    raise Interrupted from None
                job_found = self._reconcile(item, since)
                if job_found is not None:
                    return job_found
                continue
            self.state.put(item.key, {"job_id": job.id})
            return job

    def _send(self, item: Item, tracker: Tracker) -> Job:
        if item.is_url:
            tracker.note("asking the service to fetch it")
            return self.client.submit_url(item.source, self.options)
        tracker.upload(os.path.getsize(item.source))

        def sent(count: int) -> None:
            if self.stop.is_set():  # abort mid-body: the service keeps nothing of a body that never ended
                raise Interrupted
            tracker.sent(count)

        try:
            return self.client.submit(item.source, self.options, on_bytes=sent)
        except Interrupted:
            self.state.remove(item.key)
            raise

    def _wait_for_room(self, seconds: float, tracker: Tracker, reason: str) -> None:
        """Wait as Retry-After says, or until a job of this run ends and frees this key's share."""
        tracker.note(f"waiting up to {seconds:.0f} s: {reason}")
        with self.room:
            self.room.wait(timeout=seconds)
        if self.stop.is_set():
            raise Interrupted

    def _collect(self, item: Item, job: Job, tracker: Tracker) -> Result:
        state = job.wait(progress=tracker.job, stop=self.stop)
        if not state.ended:
            raise Interrupted
        with self.room:
            self.room.notify_all()
        failure = state.failure()
        if failure is not None:
            self.state.remove(item.key)
            return Result(item.source, "failed", job.id, error=failure.message, code=failure.code)
        try:
            for fmt, path in item.outputs.items():
                _write(path, job.download(fmt))
        except OSError as error:  # a read-only directory, a full disk: the entry stays, the next run collects it
            if isinstance(error, requests.RequestException):
                raise  # requests' errors are OSErrors too; a lost download is a connection failure
            message = f"cannot write the transcript: {error}; run the same command again to collect it"
            return Result(item.source, "failed", job.id, error=message, code="write_failed")
        self.state.remove(item.key)
        return Result(item.source, "completed", job.id, [str(path) for path in item.outputs.values()])


def _write(path: Path, data: bytes) -> None:
    """Write a transcript whole, durably, as an ordinary file of the user's (0666 less the umask)."""
    # Durable before the state entry goes: a power loss must not leave an empty transcript a later run skips.
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, 0o666)
