"""The typed client: `Client(url, key).submit(path, options) -> Job`, `job.wait()`, `job.download(fmt)`.

Reads (GET, and DELETE, which the service makes safe to repeat) are retried on connection errors with
backoff; an upload is never retried here, because only its caller knows whether the service already has it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import requests

from whisper_flask_client.errors import JobError, RetryLater, ServiceError, error_for

#: Seconds between connection retries of a read: doubling from the first, at most the last, this many tries.
BACKOFF = (0.5, 8.0, 6)
#: Seconds to wait for the service to answer (connect, read); an upload's body may take much longer to send.
TIMEOUT = (10.0, 120.0)
#: The transcript formats the service writes.
FORMATS = ("txt", "srt", "vtt", "json", "tsv")
#: Statuses after which a job changes no more.
ENDED = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class Options:
    """What to ask of a transcription; None leaves the service's default."""

    language: str | None = None
    task: str | None = None
    word_timestamps: bool = False

    def fields(self) -> dict[str, str]:
        """The options as the service's form or query fields."""
        out = {"language": self.language or "", "task": self.task or ""}
        if self.word_timestamps:
            out["word_timestamps"] = "true"
        return {name: value for name, value in out.items() if value}


@dataclass(frozen=True)
class JobState:
    """A job as /progress shows it at one moment."""

    id: str
    status: str
    progress: float = 0.0
    stage: str = ""
    eta_seconds: float | None = None
    queue_position: int | None = None
    filename: str = ""
    error: str | None = None
    error_code: str | None = None
    body: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> JobState:
        """Read the service's JSON shape of a job."""
        return cls(
            id=str(body["transcription_id"]),
            status=str(body["status"]),
            progress=float(body.get("progress") or 0.0),
            stage=str(body.get("stage") or ""),
            eta_seconds=body.get("eta_seconds"),
            queue_position=body.get("queue_position"),
            filename=str(body.get("filename") or ""),
            error=body.get("error"),
            error_code=body.get("error_code"),
            body=body,
        )

    @property
    def ended(self) -> bool:
        """Whether the job changes no more."""
        return self.status in ENDED

    def failure(self) -> ServiceError | None:
        """The exception for a job that ended without a transcript, named for its error code; else None."""
        if self.status == "completed":
            return None
        if self.status == "cancelled":
            return error_for(409, {"error": "the job was cancelled", "code": "no_transcript"}, None)
        body = {"error": self.error or "the job failed", "code": self.error_code or "service_error"}
        error = error_for(500, body, None)
        return error if self.error_code else JobError(error.message, error.code, 500, body, None)


@dataclass(frozen=True)
class Transcript:
    """A finished transcription: its text, language and timed segments."""

    text: str
    language: str | None
    segments: list[dict[str, Any]]
    job_id: str


class Client:
    """A whisper_flask service at `url`, used with one API key."""

    def __init__(
        self, url: str, key: str, session: requests.Session | None = None, stop: threading.Event | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.session = session or requests.Session()
        self.session.headers["Authorization"] = f"Bearer {key}"
        #: Set to give up retrying: a connection error then raises at once instead of after the backoff.
        self.stop = stop or threading.Event()

    def request(self, method: str, path: str, *, retry: bool = True, **kwargs: Any) -> requests.Response:
        """One request; an error answer raises its ServiceError, a connection error is retried when `retry`."""
        delay, most, tries = BACKOFF
        for attempt in range(tries):
            try:
                response = self.session.request(method, self.url + path, timeout=TIMEOUT, **kwargs)
                break
            except requests.ConnectionError:
                # Waiting on `stop`, not sleeping: Ctrl-C must not sit out up to 15 s of backoff.
                if not retry or attempt == tries - 1 or self.stop.wait(min(most, delay * 2**attempt)):
                    raise
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            raise error_for(response.status_code, body, response.headers.get("Retry-After"))
        return response

    def check(self) -> dict[str, Any]:
        """The queue's state; the cheapest request that proves the key and the address."""
        return dict(self.request("GET", "/queue").json())

    def submit(
        self,
        path: str | os.PathLike[str],
        options: Options | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> Job:
        """Upload one audio file as the raw body and queue it; `on_bytes(n)` is told each chunk sent."""
        source = Path(path)
        params = {"filename": source.name, **(options or Options()).fields()}
        with source.open("rb") as file:
            body = _Reader(file, source.stat().st_size, on_bytes)
            response = self.request(
                "POST",
                "/upload",
                retry=False,
                params=params,
                data=body,
                headers={"Content-Type": "application/octet-stream"},
            )
        return Job(self, response.json()["transcription_id"])

    def submit_url(self, url: str, options: Options | None = None) -> Job:
        """Queue the audio at `url`, which the service fetches."""
        body = {"url": url, **(options or Options()).fields()}
        response = self.request("POST", "/upload", retry=False, json=body)
        return Job(self, response.json()["transcription_id"])

    def job(self, job_id: str) -> Job:
        """A job submitted earlier, by its id."""
        return Job(self, job_id)

    def jobs(self, status: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """This key's jobs, newest first."""
        params: dict[str, Any] = {"limit": limit, **({"status": status} if status else {})}
        return list(self.request("GET", "/jobs", params=params).json()["jobs"])

    def transcribe(self, path: str | os.PathLike[str], options: Options | None = None) -> Transcript:
        """Upload, wait and return the transcript; waits out a full queue as the service's Retry-After says."""
        while True:
            try:
                job = self.submit(path, options)
                break
            except RetryLater as error:
                time.sleep(error.retry_after or 5)
        state = job.wait()
        failure = state.failure()
        if failure is not None:
            raise failure
        result = json.loads(job.download("json"))
        text = str(result.get("text", "")).strip()
        return Transcript(text, result.get("language"), result.get("segments", []), job.id)


class Job:
    """A job on the service: follow it, download its transcripts, cancel it."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def state(self) -> JobState:
        """The job's status and progress now."""
        return JobState.from_body(self.client.request("GET", f"/progress/{quote(self.id)}").json())

    def wait(
        self,
        progress: Callable[[JobState], None] | None = None,
        poll: float = 0.5,
        timeout: float | None = None,
        stop: threading.Event | None = None,
    ) -> JobState:
        """Poll until the job ends (or `stop` is set, or `timeout` passes) and return its last state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        stop = stop or threading.Event()
        while True:
            state = self.state()
            if progress is not None:
                progress(state)
            if state.ended or stop.is_set() or (deadline is not None and time.monotonic() > deadline):
                return state
            stop.wait(poll)

    def download(self, fmt: str = "txt") -> bytes:
        """The transcript in one format (txt, srt, vtt, json, tsv)."""
        return self.client.request("GET", f"/download/{quote(self.id)}.{quote(fmt)}").content

    def cancel(self) -> JobState:
        """Cancel the job if it is pending or running; delete its files if it has ended."""
        return JobState.from_body(self.client.request("DELETE", f"/jobs/{quote(self.id)}").json())


class _Reader:
    """A file as a request body that reports each chunk read, with a length so the body is not chunked."""

    def __init__(self, file: IO[bytes], size: int, on_bytes: Callable[[int], None] | None) -> None:
        self.file = file
        self.size = size
        self.on_bytes = on_bytes

    def __len__(self) -> int:
        return self.size

    def read(self, size: int = -1) -> bytes:
        """The next chunk, told to `on_bytes` (which may raise to abort the upload)."""
        data = self.file.read(size if size and size > 0 else 64 * 1024)
        if data and self.on_bytes is not None:
            self.on_bytes(len(data))
        return data

    def __iter__(self) -> Iterator[bytes]:
        return iter(lambda: self.read(64 * 1024), b"")
