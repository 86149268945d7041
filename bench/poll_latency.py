"""Latency of GET /progress through nginx while two long jobs transcribe, against an idle service.

    .venv/bin/python bench/poll_latency.py [--model base] [--requests 1000] [--seconds 300]

Starts real gunicorn (deploy/gunicorn.conf.py) behind real nginx (the shipped site) on loopback,
polls /progress over one keep-alive connection with no jobs running (baseline), then again while
two long speech files transcribe, and prints p50/p99 of both and their ratio.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peers import joined_speech, speech_passages  # noqa: E402
from tests.servers import curl, free_port, render_nginx, start_gunicorn, start_nginx, stop  # noqa: E402
from whisper_flask.access.keys import KeyStore  # noqa: E402
from whisper_flask.engine.checkpoints import ensure_checkpoint  # noqa: E402
from whisper_flask.jobs.database import open_engine  # noqa: E402


def poll(port: int, path: str, count: int, key: str) -> list[float]:
    """Milliseconds per GET over one keep-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port)
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        connection.request("GET", path, headers={"Authorization": f"Bearer {key}"})
        response = connection.getresponse()
        response.read()
        latencies.append((time.perf_counter() - started) * 1000)
        assert response.status == 200, response.status
    connection.close()
    return latencies


def percentile(values: list[float], share: float) -> float:
    return statistics.quantiles(values, n=100)[int(share) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=300.0, help="length of each long job")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="whisper-poll-"))
    model_dir = work / "models"
    ensure_checkpoint(args.model, model_dir, allow_download=False)
    (work / "transcripts").mkdir()
    keys = KeyStore(open_engine(work / "transcripts" / "jobs.sqlite3"))
    key = keys.create("bench", admin=True)
    keys.close()
    auth = ("-H", f"Authorization: Bearer {key}")
    upstream, port = free_port(), free_port()
    app = start_gunicorn(work, model_dir, upstream, MODEL=args.model, MAX_WORKERS="2", PROXY_FIX="1")
    proxy = start_nginx(render_nginx(work, upstream, port, free_port()), port)
    try:
        base = f"http://127.0.0.1:{port}"
        passages = [path for path, _ in speech_passages(work / "passages", 2, 20)]
        warm = json.loads(curl(*auth, "-F", f"file=@{passages[0]}", f"{base}/upload")[1])
        path = f"/progress/{warm['transcription_id']}"
        while json.loads(curl(*auth, f"{base}{path}")[1])["status"] != "completed":
            time.sleep(0.1)  # the baseline is an idle service
        idle = poll(port, path, args.requests, key)

        ids = []
        for i in range(2):
            audio = joined_speech(work / f"long-{i}.wav", args.seconds, passages[i:] + passages[:i])
            ids.append(json.loads(curl(*auth, "-F", f"file=@{audio}", f"{base}/upload")[1])["transcription_id"])
        while any(json.loads(curl(*auth, f"{base}/progress/{j}")[1])["stage"] != "transcribing" for j in ids):
            time.sleep(0.1)
        busy = poll(port, f"/progress/{ids[0]}", args.requests, key)
        states = [json.loads(curl(*auth, f"{base}/progress/{j}")[1]) for j in ids]
        assert all(state["status"] == "in_progress" for state in states), "the jobs ended before the polls did"
    finally:
        stop(proxy)
        stop(app)

    print(f"model {args.model}, {args.requests} GET /progress through nginx, one keep-alive connection")  # noqa: T201
    for name, values in (("idle", idle), ("2 jobs transcribing", busy)):
        p50, p99 = percentile(values, 50), percentile(values, 99)
        print(f"{name:<20} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  max {max(values):6.2f} ms")  # noqa: T201
    print(f"busy/idle p50 ratio {percentile(busy, 50) / percentile(idle, 50):.2f}, "  # noqa: T201
          f"p99 ratio {percentile(busy, 99) / percentile(idle, 99):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
