"""Is another key's job refused faster or slower than an unknown id? Paired timings of the service's view.

    .venv/bin/python bench/id_timing.py [--pairs 3000]

Builds the app (the model is never loaded), queues one job of key `alice` without running it and
ends another, then asks as key `bob` for each of them and for an unknown id, in pairs of
alternating order, and prints each mean paired difference with its z score. All must be refused
alike, in the same time (|z| under about 3).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from whisper_flask import create_app  # noqa: E402
from whisper_flask.access.control import Principal  # noqa: E402
from whisper_flask.engine.options import TranscribeOptions  # noqa: E402
from whisper_flask.exceptions import JobNotFound  # noqa: E402
from whisper_flask.extension import get_service  # noqa: E402
from whisper_flask.jobs.records import Submission  # noqa: E402


def timed(view: object, job_id: str, principal: Principal) -> float:
    """Seconds one view of `job_id` took; it must be refused as unknown."""
    start = time.perf_counter()
    try:
        view(job_id, principal)  # type: ignore[operator]
    except JobNotFound:
        return time.perf_counter() - start
    raise AssertionError("the job was shown to another key")


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        base = Path(work)
        app = create_app({"UPLOAD_DIR": base / "u", "TRANSCRIPT_DIR": base / "t", "LOG_DIR": base / "l"})
        service = get_service(app)
        registry = service.parts.registry
        registry.open()  # takes jobs; nothing runs them
        request = Submission("a.wav", TranscribeOptions(), "alice")
        active, ended = (request.job(uuid.uuid4().hex, "none", upload_name="a") for _ in range(2))
        registry.add(active), registry.add(ended)
        registry.cancel(ended.id)
        bob = Principal("bob", admin=False)
        lines = []
        for name, job in (("active", active), ("ended", ended)):
            differences = []
            for n in range(args.pairs):
                unknown = uuid.uuid4().hex
                if n % 2:
                    foreign, missing = timed(service.view, job.id, bob), timed(service.view, unknown, bob)
                else:
                    missing, foreign = timed(service.view, unknown, bob), timed(service.view, job.id, bob)
                differences.append(missing - foreign)
            mean = statistics.fmean(differences)
            z = mean / (statistics.stdev(differences) / math.sqrt(len(differences)))
            lines.append(
                f"{args.pairs} pairs: unknown id minus another key's {name} job: {mean * 1e6:+.2f} us (z = {z:+.1f})"
            )
        service.stop()
    print("\n".join(lines))  # noqa: T201


if __name__ == "__main__":
    main()
