"""Reading a job's transcript: by key or by signed link, whole or as far as its finished windows."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from whisper_flask.access.control import UNRESTRICTED, LinkSigner, Principal
from whisper_flask.exceptions import LinkRevoked, NoTranscript, TranscriptMissing, TranscriptNotReady, UnknownFormat
from whisper_flask.jobs.records import Job, JobStatus, JobView
from whisper_flask.jobs.resume import load_resume
from whisper_flask.jobs.writers import FORMATS, formats_of, transcript_path


class TranscriptReader:
    """Finds transcripts of the jobs a principal may see; paths come from job ids and known formats only."""

    def __init__(
        self,
        view: Callable[[str, Principal], JobView],
        signer: LinkSigner,
        owner_active: Callable[[str | None], bool],
        transcript_dir: Path,
    ) -> None:
        self._view = view
        self._signer = signer
        self._owner_active = owner_active
        self._transcript_dir = transcript_dir

    def path(self, job_id: str, fmt: str, principal: Principal) -> tuple[Job, Path]:
        """A completed job and the path of its transcript in `fmt`."""
        return self._transcript(self._view(job_id, principal).job, fmt)

    def path_by_link(self, job_id: str, fmt: str, expires: str, signature: str) -> tuple[Job, Path]:
        """A transcript opened by a signed link instead of a key; LinkRefused (or a subclass) if not valid."""
        self._signer.verify(job_id, fmt, expires, signature)
        job = self._view(job_id, UNRESTRICTED).job
        if not self._owner_active(job.owner):  # a revoked key's links close with it
            raise LinkRevoked("the API key this transcript belongs to was revoked; the link no longer opens it")
        return self._transcript(job, fmt)

    def _transcript(self, job: Job, fmt: str) -> tuple[Job, Path]:
        if fmt not in FORMATS:
            raise UnknownFormat(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
        if fmt not in formats_of(job.options):
            raise UnknownFormat(f"the {fmt!r} transcript is made only for jobs submitted with diarize=true")
        if not job.status.terminal:
            raise TranscriptNotReady("the transcript is not ready yet", job.status.value, job.progress)
        if job.status is not JobStatus.COMPLETED:
            raise NoTranscript(f"the job is {job.status.value}; it has no transcript", job.status.value)
        # Built from the registry's id and a known format, never from the URL's text.
        path = transcript_path(self._transcript_dir, job.id, fmt)
        if not path.is_file():
            raise TranscriptMissing("the transcript file is gone")
        return job, path

    def segments_so_far(self, job_id: str, principal: Principal) -> list[dict[str, Any]]:
        """The segments of a running job's finished windows (its resume state); empty before its first."""
        job = self._view(job_id, principal).job
        window = load_resume(self._transcript_dir, job.id)
        return window.segments if window else []

    def result(self, job_id: str, principal: Principal) -> dict[str, Any]:
        """A completed job's whole result: text, segments and language, as Whisper gave them."""
        _, path = self.path(job_id, "json", principal)
        result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return result
