"""The order in which pending jobs start: round-robin over keys, so one key's many jobs cannot bury another's.

Jobs start round by round. In each round every key with pending jobs starts its oldest one; the
keys go in the order of their last start, longest ago first (a key that has not started a job yet
goes first, the one with the oldest job first among those). Jobs without an owner (AUTH off) count
as one key. The registry applies the order under its lock: it starts the first job of the order
(registry.start_next), and a pending job's queue position is its place in the order.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

from whisper_flask.jobs.records import Job, JobStatus

#: The rank of a key that has not started a job since the registry was built.
NEVER = -1


def start_order(pending: Iterable[Job], last_start: Mapping[str | None, int]) -> list[Job]:
    """The pending jobs in the order they will start, given each key's last start (a rising counter)."""
    # Applied under the registry's lock to its live records: it holds no state and takes no lock.
    ordered = sorted(pending, key=lambda job: job.seq)
    rounds: dict[str, int] = {}  # how many of its key's jobs are ahead of each job
    counts: dict[str | None, int] = {}
    oldest: dict[str | None, int] = {}
    for job in ordered:
        rounds[job.id] = counts.get(job.owner, 0)
        counts[job.owner] = rounds[job.id] + 1
        oldest.setdefault(job.owner, job.seq)
    rank = {owner: (last_start.get(owner, NEVER), seq) for owner, seq in oldest.items()}
    return sorted(ordered, key=lambda job: (rounds[job.id], rank[job.owner]))


class Turns:
    """Each key's last start, and the order and queue positions it gives; the registry's lock guards it."""

    def __init__(self) -> None:
        self._starts = itertools.count()
        self._last_start: dict[str | None, int] = {}

    def order(self, active: Iterable[Job]) -> list[Job]:
        """The pending ones among `active` in the order they will start."""
        return start_order((job for job in active if job.status is JobStatus.PENDING), self._last_start)

    def positions(self, active: Iterable[Job]) -> dict[str, int]:
        """Each pending job's queue position: its place in the order in which jobs start."""
        return {job.id: position for position, job in enumerate(self.order(active), 1)}

    def started(self, owner: str | None) -> None:
        """`owner`'s job has started: its key goes to the back of the rotation."""
        self._last_start[owner] = next(self._starts)
