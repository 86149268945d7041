"""Whether the queue takes one more job: its capacity in all, and each key's fair share of it."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from whisper_flask.exceptions import QueueFull, TooManyJobs
from whisper_flask.jobs.records import Job


@dataclass(frozen=True)
class QueueLimits:
    """How many jobs may be pending and running at once: in all, and per key."""

    capacity: int
    per_owner: int

    def refuse_if_full(self, active: Collection[Job], owner: str | None) -> None:
        """Raise QueueFull, or TooManyJobs for `owner`'s share, if the `active` jobs leave no place for one more."""
        # `active` is the registry's live view of its jobs, so this runs under the registry's lock;
        # add() checks and inserts under one hold of it, so no other job takes the place between.
        if len(active) >= self.capacity:
            raise QueueFull(
                f"{len(active)} jobs are queued or running, the limit is {self.capacity}; retry later",
                retry_after=_retry_after(active),
            )
        if owner is None:
            return
        mine = [job for job in active if job.owner == owner]
        if len(mine) >= self.per_owner:
            raise TooManyJobs(
                f"this key has {len(mine)} jobs queued or running, the limit per key is {self.per_owner}",
                retry_after=_retry_after(mine),
            )


def _retry_after(jobs: Iterable[Job]) -> int:
    """Seconds until the soonest of these jobs should end (30 when none has an estimate yet)."""
    etas = [job.eta_seconds for job in jobs if job.eta_seconds is not None]
    return max(1, min(600, math.ceil(min(etas)))) if etas else 30
