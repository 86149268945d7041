"""The crash rule: which of the jobs a dead process left running is charged for it, and which run alone.

The crash is charged (an attempt kept) only to a job that alone could have caused it. A job
still fetching or decoding is innocent: it has run no model step, and ffprobe and ffmpeg run in
processes of their own; so is one waiting for disk space (its stage stored while the store still
took writes), which runs no model step while it waits. Jobs past decoding share the model
thread's steps and the memory, so when several were there none can be blamed: none is charged,
and each runs isolated (alone) until it ends. A poison file then crashes the process alone, is
charged, and fails after MAX_ATTEMPTS; nothing else ever pays for it. The registry applies the
rule under its lock (registry.recover).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from whisper_flask.jobs.ports import JobStore
from whisper_flask.jobs.records import Job, JobStage, JobStatus, ended, pending_again

#: A job charged with this many crashes of the process fails instead of running again.
MAX_ATTEMPTS = 2
#: Stages in which a job runs no model step, so it cannot have crashed the process.
INNOCENT_STAGES = (JobStage.FETCHING, JobStage.DECODING_AUDIO, JobStage.WAITING_FOR_STORAGE)


def suspects(unfinished: Iterable[Job]) -> set[str]:
    """The ids of the jobs that could have crashed the process: running, and in none of the INNOCENT_STAGES."""
    return {job.id for job in unfinished if job.status is JobStatus.IN_PROGRESS
            and job.stage not in INNOCENT_STAGES}  # fmt: skip


def after_crash(job: Job, suspected: set[str]) -> Job:
    """A job that was running when the process died, as it goes on: pending again, or failed `interrupted`."""
    charged = suspected == {job.id}
    if charged and job.attempts >= MAX_ATTEMPTS:
        message = f"the service stopped during this job {job.attempts} times; not retrying"
        return ended(job, JobStatus.FAILED, "interrupted", message)
    return dataclasses.replace(
        pending_again(job),
        attempts=job.attempts if charged else job.attempts - 1,
        isolated=job.isolated or job.id in suspected,
    )


def may_start(job: Job, active: Iterable[Job]) -> bool:
    """Whether a pending job may start beside the running ones among `active`: an isolated job runs alone."""
    running = [other for other in active if other.status is JobStatus.IN_PROGRESS]
    return not running or not (job.isolated or any(other.isolated for other in running))


def judge_and_store(store: JobStore) -> list[Job]:
    """The jobs a dead process left unfinished, oldest first, with this rule's verdicts stored in one transaction."""
    unfinished = store.unfinished()
    suspected = suspects(unfinished)
    judged = [after_crash(job, suspected) if job.status is JobStatus.IN_PROGRESS else job for job in unfinished]
    # All at once: a refused write changes nothing, and the next start judges from the same records
    # (a half-written set could charge a bystander).
    store.update_all([job for job, before in zip(judged, unfinished, strict=True) if job is not before])
    return judged
