"""The queue's order: jobs start round-robin over keys, and a queue position is the order of starting."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

from flask import Flask

from tests.helpers import FakeEngine, eventually, keyed, sqlite_store, submit, wait_for
from whisper_flask.engine.options import TranscribeOptions
from whisper_flask.extension import get_service
from whisper_flask.jobs.records import Job, JobStatus
from whisper_flask.jobs.registry import JobRegistry


def started_order(engine: FakeEngine) -> list[str | None]:
    """The jobs' names (their prompts) in the order the engine saw them start."""
    return [options.initial_prompt for options in engine.options]


def test_another_keys_job_starts_next_however_many_jobs_one_key_queued(
    make_app: Callable[..., Flask], engine: FakeEngine
) -> None:
    app = make_app(MAX_WORKERS=1)
    alice, bob = keyed(app, "alice"), keyed(app, "bob")
    engine.gate.clear()
    names = [f"a{n}" for n in range(1, 7)]
    ids = {name: submit(alice, initial_prompt=name) for name in names}
    eventually(lambda: started_order(engine) == ["a1"], timeout=10, message="alice's first job never started")
    ids["b1"] = submit(bob, initial_prompt="b1")
    registry = get_service(app).parts.registry
    positions = {name: registry.view(job_id).queue_position for name, job_id in ids.items()}
    assert positions == {"a1": None, "b1": 1, "a2": 2, "a3": 3, "a4": 4, "a5": 5, "a6": 6}
    engine.gate.set()
    wait_for(alice, ids["a6"], "completed", timeout=30)
    assert started_order(engine) == ["a1", "b1", "a2", "a3", "a4", "a5", "a6"], "jobs start in their queue order"


def test_three_keys_take_turns_and_positions_say_the_order_of_starting(
    make_app: Callable[..., Flask], engine: FakeEngine
) -> None:
    app = make_app(MAX_WORKERS=1)
    clients = {name: keyed(app, name) for name in ("alice", "bob", "carol")}
    engine.gate.clear()
    ids = {"a1": submit(clients["alice"], initial_prompt="a1")}
    eventually(lambda: started_order(engine) == ["a1"], timeout=10, message="the first job never started")
    for name in ("a2", "a3", "b1", "b2", "c1", "b3"):
        owner = {"a": "alice", "b": "bob", "c": "carol"}[name[0]]
        ids[name] = submit(clients[owner], initial_prompt=name)
    registry = get_service(app).parts.registry
    by_position = sorted((registry.view(job_id).queue_position or 0, name) for name, job_id in ids.items())
    expected = ["b1", "c1", "a2", "b2", "a3", "b3"]  # bob and carol have not started a job; bob's came first
    assert [name for position, name in by_position if position] == expected
    engine.gate.set()
    eventually(lambda: len(started_order(engine)) == len(ids), timeout=30, message="not every job started")
    assert started_order(engine) == ["a1", *expected]


def job(owner: str) -> Job:
    """A new job of `owner` (no audio: the registry never opens it)."""
    return Job(id=uuid.uuid4().hex, filename="a.wav", upload_name="a.upload", options=TranscribeOptions(),
               model="fake", owner=owner)  # fmt: skip


def test_jobs_keep_their_turns_after_a_restart(tmp_path: Path) -> None:
    store = sqlite_store(tmp_path / "jobs.sqlite3")
    registry = JobRegistry(store, capacity=10, per_owner=10)
    registry.open()
    a1, a2, a3, b1 = (registry.add(job(owner)).job for owner in ("alice", "alice", "alice", "bob"))
    started = registry.start_next()
    assert started is not None and started.id == a1.id
    before = [registry.view(j.id).queue_position for j in (b1, a2, a3)]
    assert before == [1, 2, 3]

    after_crash = JobRegistry(store, capacity=10, per_owner=10)  # the process died with a1 decoding
    after_crash.open()
    assert after_crash.recover() == ([a1.id, a2.id, a3.id, b1.id], [])
    assert [after_crash.view(j.id).queue_position for j in (a1, b1, a2, a3)] == [1, 2, 3, 4]
    order = []
    while (next_job := after_crash.start_next()) is not None:
        order.append(next_job.id)
        after_crash.finish(next_job.id, JobStatus.COMPLETED)
    assert order == [a1.id, b1.id, a2.id, a3.id], "the interrupted job resumes first, the others keep their turns"
    store.close()
