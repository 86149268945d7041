"""Cluster mode with the real programs on loopback: PostgreSQL, redis-server, an API gunicorn and two Celery workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

from tests.helpers import LiveClient, assert_same_json_transcript, eventually, submit, transcripts, wait_for, wait_until
from tests.servers import (
    FIXTURES,
    ROOT,
    Postgres,
    Receiver,
    Redis,
    Servers,
    free_port,
    service_env,
    serving,
    start_gunicorn,
    stop,
)
from whisper_flask.jobs.celery_queue import TASK, make_celery
from whisper_flask.settings import Settings

pytestmark = pytest.mark.slow

CHAPTER = FIXTURES / "lj001-chapter-70s.opus"
SHORT = [FIXTURES / name for name in ("fox.wav", "garden.wav", "train.wav", "report.wav")]
#: A short lease, so that a dead worker's job is taken over within seconds here (the default is 30 s).
LEASE_S = "3"


@dataclass
class Cluster:
    """The running cluster: its servers, its broker and database, a client of its API node, and the workers."""

    servers: Servers
    redis: Redis
    postgres: Postgres
    client: LiveClient  # an admin key's
    user: LiveClient  # an ordinary key's
    settings: dict[str, str]
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start_worker(self, name: str) -> None:
        """Start (or start again) the worker called `name`."""
        self.workers[name] = self.servers.worker(name, **self.settings)

    def sql(self, query: str) -> list[str]:
        """The rows of a query on the job database, one line each."""
        out = subprocess.run(
            ["psql", self.postgres.url, "-At", "-c", query], check=True, capture_output=True, text=True
        ).stdout
        return out.splitlines()

    def log(self) -> str:
        """Every node's log (they share LOG_DIR, as nodes on one machine would)."""
        return (self.servers.work / "logs" / "whisper_flask.log").read_text()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, postgres: Postgres) -> Iterator[Cluster]:
    """An API node and two workers (one job at a time each) on a fresh database and broker; stopped after the module."""
    postgres.reset()
    work = tmp_path_factory.mktemp("cluster")
    redis = Redis(work)
    settings = {"DATABASE_URL": postgres.url, "BROKER_URL": redis.url, "LEASE_S": LEASE_S, "MAX_WORKERS": "1",
                "URL_ALLOW": "127.0.0.1"}  # fmt: skip
    key = create_cluster_key(work, model_dir, settings, "operator", admin=True)
    user = create_cluster_key(work, model_dir, settings, "user", admin=False)
    try:
        with Servers(work, model_dir) as servers:
            settings["PUBLIC_URL"] = f"http://127.0.0.1:{servers.port}"
            port, _ = servers.gunicorn(**settings)
            running = Cluster(servers, redis, postgres, LiveClient(port, key), LiveClient(port, user), settings)
            for name in ("one", "two"):
                running.start_worker(name)
            yield running
    finally:
        redis.kill()


def create_cluster_key(work: Path, model_dir: Path, settings: dict[str, str], name: str, *, admin: bool) -> str:
    """A key in the cluster's database, made with `flask keys create` as an operator would."""
    out = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi:app", "keys", "create", "--name", name,
         *(["--admin"] if admin else [])],
        cwd=ROOT, env=service_env(work, model_dir, **settings), check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return next(word for word in out.split() if word.startswith("wf_"))


def transcribing(record: dict[str, object]) -> bool:
    """A job past its first window: its resume state holds finished segments."""
    return record["status"] == "in_progress" and float(record["processed_seconds"] or 0) > 0  # type: ignore[arg-type]


def test_jobs_spread_over_both_workers_and_each_runs_once(cluster: Cluster) -> None:
    """Jobs submitted together run on both workers, each once, and every one completes."""
    ids = [submit(cluster.client, path) for path in SHORT]
    for job_id in ids:
        record = wait_for(cluster.client, job_id, timeout=300)
        assert (record["status"], record["attempts"]) == ("completed", 1), record
    quoted = ",".join(f"'{job_id}'" for job_id in ids)
    runners = {row.split("@")[0] for row in cluster.sql(f"SELECT lease_owner FROM jobs WHERE id IN ({quoted})")}
    assert len(runners) == 2, runners


def test_queue_lists_each_worker_to_admin_keys_only(cluster: Cluster) -> None:
    """GET /queue names every live worker (host, model, running jobs, last beat) to an admin key; not to others."""
    stats = cluster.client.get("/queue").get_json()
    assert len(stats["worker_nodes"]) == 2, stats
    for node in stats["worker_nodes"]:
        assert node["model"] == "tiny.en" and node["capacity"] == 1
        assert node["seconds_since_heartbeat"] < 5
    ordinary = cluster.user.get("/queue").get_json()
    assert ordinary["worker_nodes"] is None and ordinary["capacity"] == stats["capacity"]


def test_two_api_nodes_deliver_a_jobs_webhook_exactly_once(cluster: Cluster) -> None:
    """With two API nodes (each runs a notifier), a finished job's webhook is sent once."""
    second = free_port()
    process = start_gunicorn(cluster.servers.work, cluster.servers.model_dir, second, **cluster.settings)
    try:
        with serving(Receiver([])) as receiver:
            job_id = submit(cluster.client, SHORT[0], callback_url=receiver.url)
            assert wait_for(cluster.client, job_id, timeout=300)["status"] == "completed"
            eventually(lambda: bool(receiver.calls), 30, "no webhook came")
            time.sleep(3)  # both notifiers poll every second: a second delivery would have come by now
            assert len(receiver.calls) == 1
            assert job_id.encode() in receiver.calls[0][1]
    finally:
        stop(process)


def test_the_openai_api_streams_a_workers_windows_then_its_whole_text(cluster: Cluster) -> None:
    """/v1 on the API node streams each window a worker finishes before the job ends, then the whole text."""
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{cluster.servers.port}/v1", api_key=cluster.client.key, max_retries=0
    )
    deltas: list[str] = []
    with CHAPTER.open("rb") as audio:
        for event in client.audio.transcriptions.create(file=audio, model="whisper-1", stream=True):
            if event.type == "transcript.text.delta":
                deltas.append(event.delta)
            else:
                done = event
    assert len(deltas) >= 2  # a 70 s recording is three windows: they came one by one
    assert done.type == "transcript.text.done" and done.text == "".join(deltas).strip()
    assert "printing" in done.text.lower()


def test_a_worker_killed_mid_job_has_its_job_resumed_elsewhere_to_the_same_transcript(cluster: Cluster) -> None:
    """SIGKILL of the worker running a job: another worker resumes it at its last window, to the undisturbed text."""
    job_id = submit(cluster.client, CHAPTER)
    wait_until(cluster.client, job_id, transcribing, timeout=300)
    (owner,) = cluster.sql(f"SELECT lease_owner FROM jobs WHERE id = '{job_id}'")
    pid = int(owner.rsplit(":", 1)[1])
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)  # as the OOM killer would: no handler runs, the lease simply stops being renewed
    record = wait_for(cluster.client, job_id, timeout=120)
    assert (record["status"], record["attempts"]) == ("completed", 2), record  # it ran alone there: charged
    assert time.monotonic() - killed_at < 120
    (resumed_by,) = cluster.sql(f"SELECT lease_owner FROM jobs WHERE id = '{job_id}'")
    assert resumed_by != owner
    assert f"job {job_id} resumes at" in cluster.log()
    for name, process in list(cluster.workers.items()):
        if process.pid == pid or process.poll() is not None:
            cluster.servers.stop(process)
            cluster.start_worker(name)

    undisturbed = submit(cluster.client, CHAPTER)
    wait_for(cluster.client, undisturbed, "completed", timeout=300)
    got, expected = transcripts(cluster.client, job_id), transcripts(cluster.client, undisturbed)
    assert got["txt"] == expected["txt"] and got["srt"] == expected["srt"]
    assert_same_json_transcript(got["json"], expected["json"])


def test_a_worker_stopped_with_sigterm_puts_its_job_back_for_another_at_no_cost(cluster: Cluster) -> None:
    """SIGTERM (systemctl stop): the worker's job goes back to pending at once, and another completes it."""
    job_id = submit(cluster.client, CHAPTER)
    wait_until(cluster.client, job_id, transcribing, timeout=300)
    (owner,) = cluster.sql(f"SELECT lease_owner FROM jobs WHERE id = '{job_id}'")
    name, process = next((n, p) for n, p in cluster.workers.items() if p.pid == int(owner.rsplit(":", 1)[1]))
    os.kill(process.pid, signal.SIGTERM)  # Celery's warm shutdown
    process.wait(timeout=60)
    assert f"job {job_id} back to pending for another worker" in cluster.log()
    record = wait_for(cluster.client, job_id, timeout=120)
    assert (record["status"], record["attempts"]) == ("completed", 1), record  # the stop cost it nothing
    cluster.servers.stop(process)
    cluster.start_worker(name)


def test_a_ticket_delivered_again_while_its_job_runs_does_not_run_it_twice(cluster: Cluster) -> None:
    """Tickets delivered again (as Redis redelivers) find the job taken: it runs once, on one worker."""
    job_id = submit(cluster.client, CHAPTER)
    wait_until(cluster.client, job_id, transcribing, timeout=300)
    sender = make_celery(Settings.load(cluster.settings))
    try:
        for _ in range(3):
            sender.send_task(TASK, args=[job_id])
    finally:
        sender.close()
    record = wait_for(cluster.client, job_id, timeout=300)
    assert (record["status"], record["attempts"]) == ("completed", 1), record
    assert cluster.log().count(f"job {job_id} in_progress") == 1


def test_a_cancel_reaches_the_running_worker_within_two_seconds(cluster: Cluster) -> None:
    """DELETE of a running job stops it on its worker within 2 s (the heartbeat sees the cancel)."""
    job_id = submit(cluster.client, CHAPTER)
    wait_until(cluster.client, job_id, transcribing, timeout=300)
    cancelled_at = time.monotonic()
    assert cluster.client.delete(f"/jobs/{job_id}").status_code == 200
    while f"job {job_id} no longer runs here" not in cluster.log():
        assert time.monotonic() - cancelled_at < 2, "the worker did not see the cancel within 2 s"
        time.sleep(0.05)
    assert cluster.client.get(f"/jobs/{job_id}").get_json()["status"] == "cancelled"


def test_redis_restarted_empty_mid_run_loses_no_job(cluster: Cluster) -> None:
    """The broker restarted without its data (every queued ticket gone): the reconciler queues the jobs again."""
    ids = [submit(cluster.client, path) for path in [CHAPTER, CHAPTER, *SHORT]]
    wait_until(cluster.client, ids[0], transcribing, timeout=300)
    cluster.redis.kill()
    response = cluster.client.get("/readyz")
    assert (response.status_code, response.get_json()["code"]) == (503, "broker_unavailable")
    for entry in cluster.redis.dir.iterdir():  # its append-only file too: the restart knows no ticket
        if entry.is_dir():
            for inner in entry.iterdir():
                inner.unlink()
        elif entry.name != "server.log":
            entry.unlink()
    cluster.redis.start(persistent=False)
    eventually(lambda: cluster.client.get("/readyz").status_code == 200, 30, "/readyz did not recover with the broker")
    for job_id in ids:
        assert wait_for(cluster.client, job_id, timeout=300)["status"] == "completed"
    assert "tickets given for pending jobs the queue did not hold" in cluster.log()


def test_postgres_restarted_mid_run_loses_no_job_and_readyz_recovers(cluster: Cluster) -> None:
    """PostgreSQL stopped and started mid-run: /readyz says 503 meanwhile, then every job completes."""
    ids = [submit(cluster.client, path) for path in [CHAPTER, *SHORT[:2]]]
    wait_until(cluster.client, ids[0], transcribing, timeout=300)
    cluster.postgres.stop("fast")  # every client cut off
    try:
        response = cluster.client.get("/readyz")
        assert (response.status_code, response.get_json()["code"]) == (503, "database_unavailable")
        time.sleep(2)
    finally:
        cluster.postgres.start()
    eventually(lambda: cluster.client.get("/readyz").status_code == 200, 30, "/readyz did not recover")
    for job_id in ids:
        assert wait_for(cluster.client, job_id, timeout=300)["status"] == "completed"
