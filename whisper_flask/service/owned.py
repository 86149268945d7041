"""Jobs as one principal may see them: its own (an admin: all), never another key's (ARCHITECTURE.md, "Access")."""

from __future__ import annotations

import re

from whisper_flask.access.control import Principal
from whisper_flask.exceptions import JobExpired, JobNotFound
from whisper_flask.jobs.ports import JobStore, Registry
from whisper_flask.jobs.records import JobStatus, JobView

_JOB_ID = re.compile(r"[0-9a-f]{32}")


class OwnedJobs:
    """Looks jobs up for a principal; an unknown, malformed or foreign id all answer JobNotFound alike."""

    def __init__(self, registry: Registry, store: JobStore) -> None:
        self._registry = registry
        self._store = store

    def view(self, job_id: str, principal: Principal, *, expired_ok: bool = False) -> JobView:
        """The job as of one moment; JobNotFound for an unknown or malformed id, JobExpired once its files are deleted.

        Another key's job is JobNotFound too, with the same message: no key learns which ids exist.
        `expired_ok` returns an expired job's record instead (deleting it again is harmless).
        """
        if not _JOB_ID.fullmatch(job_id):  # checked before any lookup
            raise JobNotFound(f"no job with id {job_id!r}")
        # Ownership first, by one small lookup that an unknown id, another key's active job and
        # another key's ended one all take alike: none is told apart by how fast it is refused.
        known, owner = self._store.owner(job_id)
        if not (principal.owns(owner) & known):  # both evaluated, known or not
            raise JobNotFound(f"no job with id {job_id!r}")
        view = self._registry.view(job_id)
        if view.job.expired_at and not expired_ok:
            raise JobExpired(f"job {job_id}'s files were deleted at {view.job.expired_at} (it expired or was deleted)")
        return view

    def views(self, status: JobStatus | None, limit: int, offset: int, principal: Principal) -> list[JobView]:
        """The principal's jobs (an admin's: all) newest first, filtered by status."""
        return self._registry.views(status, None if principal.admin else principal.name, limit, offset)
