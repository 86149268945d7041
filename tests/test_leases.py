"""Cluster leases, claims, fences and the reconciler on a real PostgreSQL (leases.py, shared_registry.py, upkeep.py)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from tests.servers import Postgres
from whisper_flask.engine.options import TranscribeOptions
from whisper_flask.exceptions import QueueFull
from whisper_flask.jobs.database import open_engine
from whisper_flask.jobs.leases import Leases
from whisper_flask.jobs.records import Job, JobStage, JobStatus, ended
from whisper_flask.jobs.registry import JobCancelled
from whisper_flask.jobs.shared_registry import SharedRegistry
from whisper_flask.jobs.store import SqlJobStore
from whisper_flask.jobs.upkeep import Heartbeat, Reconciler


class Tickets:
    """Stands in for the broker: counts the tickets sent, and says how many wait."""

    def __init__(self, waiting: int = 0) -> None:
        self.sent: list[str] = []
        self._waiting = waiting

    def submit(self, job_id: str) -> None:
        self.sent.append(job_id)

    def waiting(self) -> int:
        return self._waiting


@pytest.fixture
def store(postgres: Postgres) -> Iterator[SqlJobStore]:
    """A job store on an emptied PostgreSQL."""
    postgres.reset()
    opened = SqlJobStore(open_engine(postgres.url))
    yield opened
    opened.close()


def node(store: SqlJobStore, name: str) -> SharedRegistry:
    """A node's registry, open, with 30 s leases."""
    registry = SharedRegistry(store, Leases(store.engine, 30), capacity=100, per_owner=100, node=name)
    registry.open()
    return registry


def new_job(n: int, **fields: object) -> Job:
    return dataclasses.replace(
        Job(id=f"{n:032x}", filename=f"{n}.wav", upload_name=f"{n}.upload", options=TranscribeOptions(), model="m"),
        **fields,
    )


def expire_leases(store: SqlJobStore, worker: str) -> None:
    """The worker stopped renewing: its leases are in the past."""
    with store.engine.begin() as connection:
        connection.execute(
            text("UPDATE jobs SET lease_until = now() - interval '1 second' WHERE lease_owner = :worker"),
            {"worker": worker},
        )


def test_two_workers_claiming_at_once_start_each_pending_job_exactly_once(store: SqlJobStore) -> None:
    api = node(store, "api")
    ids = [api.add(new_job(n)).job.id for n in range(12)]
    workers = [node(store, f"w{n}") for n in range(2)]
    claimed: list[tuple[str, str]] = []

    def take(worker: SharedRegistry, name: str) -> None:
        while (job := worker.start_next()) is not None:
            claimed.append((job.id, name))
            worker.finish(job.id, JobStatus.COMPLETED)

    threads = [threading.Thread(target=take, args=(worker, f"w{n}")) for n, worker in enumerate(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(job_id for job_id, _ in claimed) == sorted(ids)
    assert all(store.get(job_id).attempts == 1 for job_id in ids)  # type: ignore[union-attr]


def test_two_api_nodes_admitting_at_once_never_pass_the_capacity(store: SqlJobStore) -> None:
    nodes = [SharedRegistry(store, Leases(store.engine, 30), capacity=5, per_owner=100, node=f"api{n}") for n in (1, 2)]
    for api in nodes:
        api.open()
    outcomes: list[str] = []

    def add(n: int) -> None:
        try:
            nodes[n % 2].add(new_job(n))
            outcomes.append("admitted")
        except QueueFull:
            outcomes.append("refused")

    threads = [threading.Thread(target=add, args=(n,)) for n in range(16)]  # more than the pool's connections
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["admitted"] * 5 + ["refused"] * 11
    assert len(store.unfinished()) == 5


def test_a_worker_that_lost_its_lease_can_no_longer_write_its_job(store: SqlJobStore) -> None:
    api, first, second = node(store, "api"), node(store, "first"), node(store, "second")
    job_id = api.add(new_job(1)).job.id
    assert first.start_next() is not None
    first.update(job_id, stage=JobStage.TRANSCRIBING, progress=40.0)
    expire_leases(store, "first")
    Reconciler(store, Leases(store.engine, 30), Tickets(), lambda job: None, 3).reconcile()
    taken = second.start_next()
    assert taken is not None and taken.id == job_id
    with pytest.raises(JobCancelled):
        first.update(job_id, progress=90.0)
    first.finish(job_id, JobStatus.COMPLETED)  # refused by the fence: the second worker's record stands
    stored = store.get(job_id)
    assert stored is not None and (stored.status, stored.attempts) == (JobStatus.IN_PROGRESS, 2)


def test_a_dead_workers_jobs_are_judged_by_the_crash_rule_and_nothing_else_is_touched(store: SqlJobStore) -> None:
    api, crowded, alone, alive = node(store, "api"), node(store, "crowded"), node(store, "alone"), node(store, "alive")
    for n in range(4):
        api.add(new_job(n))
    together = [crowded.start_next(), crowded.start_next()]  # two jobs on one worker: neither can be blamed
    for job in together:
        assert job is not None
        crowded.update(job.id, stage=JobStage.TRANSCRIBING)
    poison = alone.start_next()  # alone, in its second attempt: charged, and out of attempts
    assert poison is not None
    alone.update(poison.id, stage=JobStage.TRANSCRIBING, attempts=2)
    healthy = alive.start_next()
    assert healthy is not None
    expire_leases(store, "crowded")
    expire_leases(store, "alone")
    released: list[str] = []
    tickets = Tickets()
    Reconciler(store, Leases(store.engine, 30), tickets, lambda job: released.append(job.id), 3).reconcile()

    for job in together:
        after = store.get(job.id)  # type: ignore[union-attr]
        assert after is not None and (after.status, after.attempts, after.isolated) == (JobStatus.PENDING, 0, True)
    failed = store.get(poison.id)
    assert failed is not None and (failed.status, failed.error_code) == (JobStatus.FAILED, "interrupted")
    assert released == [poison.id]
    assert store.get(healthy.id).status is JobStatus.IN_PROGRESS  # type: ignore[union-attr]
    assert sorted(tickets.sent) == sorted(job.id for job in together)  # type: ignore[union-attr]


def test_a_job_its_worker_ended_while_the_reconciler_judged_keeps_its_end(store: SqlJobStore) -> None:
    api, worker = node(store, "api"), node(store, "worker")
    job_id = api.add(new_job(1)).job.id
    job = worker.start_next()
    assert job is not None
    expire_leases(store, "worker")
    leases = Leases(store.engine, 30)
    real_expired = leases.expired

    def ended_meanwhile(connection):  # type: ignore[no-untyped-def]
        found = real_expired(connection)
        store.update(ended(job, JobStatus.COMPLETED, None, None))  # the worker's last write, just in time
        return found

    leases.expired = ended_meanwhile  # type: ignore[method-assign]
    Reconciler(store, leases, Tickets(), lambda job: None, 3).reconcile()
    assert store.get(job_id).status is JobStatus.COMPLETED  # type: ignore[union-attr]


def test_tickets_are_topped_up_to_the_pending_jobs_the_broker_does_not_hold(store: SqlJobStore) -> None:
    api = node(store, "api")
    ids = [api.add(new_job(n)).job.id for n in range(3)]
    tickets = Tickets(waiting=1)
    Reconciler(store, Leases(store.engine, 30), tickets, lambda job: None, 3).reconcile()
    assert len(tickets.sent) == 2 and set(tickets.sent) <= set(ids)
    enough = Tickets(waiting=3)
    Reconciler(store, Leases(store.engine, 30), enough, lambda job: None, 3).reconcile()
    assert enough.sent == []


def test_a_job_put_back_by_a_stopping_worker_gets_a_ticket_at_once_and_costs_no_attempt(store: SqlJobStore) -> None:
    api, tickets = node(store, "api"), Tickets()
    stopping = SharedRegistry(store, Leases(store.engine, 30), 100, 100, "stopping", requeue=tickets.submit)
    stopping.open()
    job_id = api.add(new_job(1)).job.id
    assert stopping.start_next() is not None
    stopping.close()
    stopping.put_back(job_id)
    assert tickets.sent == [job_id]
    stored = store.get(job_id)
    assert stored is not None and (stored.status, stored.attempts) == (JobStatus.PENDING, 0)


def test_an_isolated_job_waits_for_an_empty_worker(store: SqlJobStore) -> None:
    api, busy, idle = node(store, "api"), node(store, "busy"), node(store, "idle")
    api.add(new_job(1))
    assert busy.start_next() is not None
    isolated = api.add(new_job(2, isolated=True)).job
    assert busy.start_next() is None  # it runs alone: not beside the busy worker's job
    started = idle.start_next()
    assert started is not None and started.id == isolated.id


def test_a_cancel_on_the_api_node_stops_the_job_at_its_workers_next_heartbeat(store: SqlJobStore) -> None:
    api, worker = node(store, "api"), node(store, "worker")
    job_id = api.add(new_job(1)).job.id
    assert worker.start_next() is not None
    heartbeat = Heartbeat(worker, Leases(store.engine, 30), "worker", "m", 1, 30)
    heartbeat.beat()
    worker.check_active(job_id)  # still its own
    cancelled, was_pending = api.cancel(job_id)
    assert (cancelled.status, was_pending) == (JobStatus.CANCELLED, False)
    heartbeat.beat()
    with pytest.raises(JobCancelled):
        worker.check_active(job_id)
    worker.finish(job_id, JobStatus.COMPLETED)
    assert store.get(job_id).status is JobStatus.CANCELLED  # type: ignore[union-attr]


def test_exactly_one_node_claims_a_due_notification(store: SqlJobStore) -> None:
    api, worker = node(store, "api"), node(store, "worker")
    job_id = api.add(new_job(1, callback_url="https://hooks.example/x")).job.id
    assert worker.start_next() is not None
    worker.finish(job_id, JobStatus.COMPLETED)
    (due,) = store.due_notifications("9999", 10)
    leases = Leases(store.engine, 30)
    claims = [leases.claim_notification(due, name) for name in ("api-1", "api-2", "api-1")]
    assert claims == [True, False, False]
    store.record_attempt(dataclasses.replace(due, attempts=1, next_attempt_at="0000"))  # failed: due again now
    assert leases.claim_notification(due, "api-2")  # the claim ended with the attempt


def test_the_reconciler_forgets_a_worker_that_died_without_leaving_and_keeps_the_live_one(store: SqlJobStore) -> None:
    leases = Leases(store.engine, 3)
    for name in ("dead", "alive"):
        assert leases.beat(name, [], "m", 2) == set()
    with store.engine.begin() as connection:
        connection.execute(text("UPDATE workers SET heartbeat_at = now() - interval '1 hour' WHERE name = 'dead'"))
    assert [worker.name for worker in leases.workers()] == ["alive", "dead"]  # reading forgets nothing
    Reconciler(store, leases, Tickets(), lambda job: None, 3).reconcile()
    (alive,) = leases.workers()
    assert (alive.name, alive.model, alive.running, alive.capacity) == ("alive", "m", 0, 2)
    assert alive.seconds_since_heartbeat < 5


def test_claims_follow_the_rotation_a_key_without_a_start_first_then_the_longest_waiting(store: SqlJobStore) -> None:
    api, worker = node(store, "api"), node(store, "worker")
    for n, owner in ((0, "a"), (1, None)):  # each key's history: a started first, then the ownerless key
        api.add(new_job(n, owner=owner))
        started = worker.start_next()
        assert started is not None
        worker.finish(started.id, JobStatus.COMPLETED)
    for n, owner in ((10, None), (11, "a"), (12, "b")):
        api.add(new_job(n, owner=owner))
    claimed = []
    while (job := worker.start_next()) is not None:
        claimed.append(job.owner)
        worker.finish(job.id, JobStatus.COMPLETED)
    assert claimed == ["b", "a", None]
