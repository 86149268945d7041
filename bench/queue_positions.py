"""What a /progress poll of a pending job costs the registry's lock, with N pending jobs of 7 keys queued.

    .venv/bin/python bench/queue_positions.py [--jobs 100 1000]

In one run, beside each other: `registry.view` as the service calls it (positions kept until a job
joins, starts or leaves), and the round-robin order sorted afresh (`Turns.positions`), which is what
every view cost before. In process, on a temporary SQLite store; no model, no HTTP.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from whisper_flask.engine.options import TranscribeOptions  # noqa: E402
from whisper_flask.jobs.database import open_engine  # noqa: E402
from whisper_flask.jobs.records import Job  # noqa: E402
from whisper_flask.jobs.registry import JobRegistry  # noqa: E402
from whisper_flask.jobs.rotation import Turns  # noqa: E402
from whisper_flask.jobs.store import SqlJobStore  # noqa: E402

REPEATS = 200


def per_call_ms(call: Callable[[], object], repeats: int = REPEATS) -> float:
    """Mean milliseconds of one call."""
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats * 1000


def measure(count: int) -> tuple[float, float]:
    """With `count` pending jobs queued: (a view of the last one, a fresh sort of them all), in ms."""
    with tempfile.TemporaryDirectory() as work:
        store = SqlJobStore(open_engine(Path(work) / "jobs.sqlite3"))
        registry = JobRegistry(store, capacity=count + 1, per_owner=count + 1)
        registry.open()
        jobs = [
            Job(id=f"{n:032x}", filename="a.wav", upload_name="a", options=TranscribeOptions(), model="m",
                owner=f"key-{n % 7}")
            for n in range(count)
        ]  # fmt: skip
        for job in jobs:
            registry.add(job)
        view = per_call_ms(lambda: registry.view(jobs[-1].id))
        stored = [registry.view(job.id).job for job in jobs]
        fresh = per_call_ms(lambda: Turns().positions(stored))
        store.close()
    return view, fresh


def cpu_model() -> str:
    """The CPU's model name, as lscpu shows it: figures differ between machines."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    """Print, per queue length, a view's cost and a fresh sort's cost."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, nargs="+", default=[100, 1000])
    args = parser.parse_args()
    sys.stdout.write(f"CPU: {cpu_model()}\npending jobs | registry.view ms | fresh sort ms\n")
    for count in args.jobs:
        view, fresh = measure(count)
        sys.stdout.write(f"{count:12d} | {view:16.3f} | {fresh:13.3f}\n")


if __name__ == "__main__":
    main()
