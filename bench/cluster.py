"""Cluster mode against one process: upload-to-start latency, and the throughput of one and two workers.

    .venv/bin/python bench/cluster.py [--model base] [--files 8] [--latency-jobs 8]

Starts the real programs on loopback, one setup after another on the same machine: one gunicorn
process (SQLite, the in-process pool); then PostgreSQL, redis-server, an API gunicorn and one Celery
worker; then the same with two workers. Each worker and the one process run MAX_WORKERS=2.

- latency: jobs submitted one at a time on an idle service (each awaited), the time from the job's
  record being made (`created_at`) to its start (`started_at`), both stamped by the service;
- throughput: `--files` copies of a real recording (tests/fixtures/lj001-chapter-70s.opus, 70 s)
  submitted at once, wall time from the first upload to the last completion.

On one machine two unpinned workers share its cores (and their OpenMP teams spin against each
other), so that figure shows contention, not the gain of a second machine. The last two setups pin
each worker to a core of its own (taskset, one torch thread): two such workers against one is what a
second machine adds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import FIXTURES, Postgres, Redis, curl, free_port, start_gunicorn, start_worker, stop  # noqa: E402
from whisper_flask.access.keys import KeyStore  # noqa: E402
from whisper_flask.engine.checkpoints import ensure_checkpoint  # noqa: E402
from whisper_flask.jobs.database import open_engine  # noqa: E402

RECORDING = FIXTURES / "lj001-chapter-70s.opus"
SHORT = FIXTURES / "fox.wav"


def make_key(database: str | Path) -> str:
    """An admin key in the setup's job database."""
    keys = KeyStore(open_engine(database))
    try:
        return keys.create("bench", admin=True)
    finally:
        keys.close()


def submit(base: str, key: str, path: Path) -> str:
    status, body = curl("-H", f"Authorization: Bearer {key}", "-F", f"file=@{path}", f"{base}/upload")
    assert status == 202, body
    return str(json.loads(body)["transcription_id"])


def record(base: str, key: str, job_id: str) -> dict[str, object]:
    return dict(json.loads(curl("-H", f"Authorization: Bearer {key}", f"{base}/jobs/{job_id}")[1]))


def wait_done(base: str, key: str, job_ids: list[str], timeout: float = 1800) -> list[dict[str, object]]:
    """Every job's record once all have ended (each must have completed)."""
    deadline = time.monotonic() + timeout
    while True:
        records = [record(base, key, job_id) for job_id in job_ids]
        if all(r["status"] in ("completed", "failed", "cancelled") for r in records):
            assert all(r["status"] == "completed" for r in records), records
            return records
        assert time.monotonic() < deadline, "the jobs did not end in time"
        time.sleep(0.2)


def seconds_between(start: object, end: object) -> float:
    return (datetime.fromisoformat(str(end)) - datetime.fromisoformat(str(start))).total_seconds()


def measure(base: str, key: str, files: int, latency_jobs: int) -> tuple[list[float], float]:
    """(upload-to-start latencies in ms, wall seconds for `files` recordings at once)."""
    wait_done(base, key, [submit(base, key, SHORT)])  # the model warm, the first job's costs paid
    latencies = []
    for _ in range(latency_jobs):
        (done,) = wait_done(base, key, [submit(base, key, SHORT)])
        latencies.append(1000 * seconds_between(done["created_at"], done["started_at"]))
    started = time.monotonic()
    wait_done(base, key, [submit(base, key, RECORDING) for _ in range(files)])
    return latencies, time.monotonic() - started


def one_process(work: Path, model_dir: Path, model: str, files: int, latency_jobs: int) -> tuple[list[float], float]:
    (work / "transcripts").mkdir(parents=True)
    key = make_key(work / "transcripts" / "jobs.sqlite3")
    port = free_port()
    server = start_gunicorn(work, model_dir, port, MODEL=model, MAX_WORKERS="2")
    try:
        return measure(f"http://127.0.0.1:{port}", key, files, latency_jobs)
    finally:
        stop(server)


def cluster(
    work: Path, model_dir: Path, model: str, workers: int, files: int, latency_jobs: int, pinned: bool = False
) -> tuple[list[float], float]:
    work.mkdir(parents=True)
    processes: list[subprocess.Popen[bytes]] = []
    postgres = Postgres()
    redis: Redis | None = None
    try:
        redis = Redis(work)
        settings = {"MODEL": model, "MAX_WORKERS": "2", "DATABASE_URL": postgres.url, "BROKER_URL": redis.url}
        key = make_key(postgres.url)
        port = free_port()
        processes.append(start_gunicorn(work, model_dir, port, **settings))
        processes += [
            start_worker(work, model_dir, f"bench{n}", [n] if pinned else None, **settings) for n in range(workers)
        ]
        return measure(f"http://127.0.0.1:{port}", key, files, latency_jobs)
    finally:
        for process in reversed(processes):
            stop(process)
        if redis is not None:
            redis.kill()
        postgres.close()  # also when Redis failed to start: no server outlives the bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--latency-jobs", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="whisper-cluster-bench-"))
    model_dir = work / "models"
    ensure_checkpoint(args.model, model_dir, allow_download=False)

    results = {
        "one process": one_process(work / "alone", model_dir, args.model, args.files, args.latency_jobs),
        "cluster, 1 worker": cluster(work / "one", model_dir, args.model, 1, args.files, args.latency_jobs),
        "cluster, 2 workers": cluster(work / "two", model_dir, args.model, 2, args.files, args.latency_jobs),
        "1 worker, 1 core": cluster(work / "one-pinned", model_dir, args.model, 1, args.files, args.latency_jobs, True),
        "2 workers, 1 core each": cluster(
            work / "two-pinned", model_dir, args.model, 2, args.files, args.latency_jobs, True
        ),
    }
    alone_latency, alone_wall = statistics.median(results["one process"][0]), results["one process"][1]
    print(f"model {args.model}; {args.files} x {RECORDING.name} at once; latency over {args.latency_jobs} jobs")  # noqa: T201
    print(f"{'setup':<24} {'start ms p50':>12} {'max':>8} {'wall s':>8} {'audio-s/s':>10} {'vs one process':>15}")  # noqa: T201
    for name, (latencies, wall) in results.items():
        p50 = statistics.median(latencies)
        print(  # noqa: T201
            f"{name:<24} {p50:12.0f} {max(latencies):8.0f} {wall:8.1f} {args.files * 70 / wall:10.1f}"
            f"   latency x{p50 / alone_latency:.1f}, throughput x{alone_wall / wall:.2f}"
        )
    pinned_one, pinned_two = results["1 worker, 1 core"][1], results["2 workers, 1 core each"][1]
    scaling = pinned_one / pinned_two
    print(f"two workers on a core each against one on one core (two machines against one): x{scaling:.2f}")  # noqa: T201


if __name__ == "__main__":
    main()
