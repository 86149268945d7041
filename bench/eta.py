"""Does /progress tell the truth? One long real recording through the service, its progress and ETA against time.

    .venv/bin/python bench/eta.py [--model base] [--speech FILE.wav] [--quantize auto] [--interval 0.25] [--work DIR]

Runs the service in this process with its default settings (QUANTIZE=auto, as the production default), submits
one job (the Kathleen recording of ../shared/speech/en/long/, about 4.5 minutes, unless --speech names another),
and reads the job as /progress shows it (`jobs/serialize.job_body` of the registry's view, no HTTP) every
--interval seconds until it completes. It prints, at the first sample at or past 10, 20, ... 90 % of the bar,
the ETA shown against the real time left (the job's finished_at minus the sample's time) and their ratio; the
worst |ETA - real| / real over every sample from 20 % on; and the share of the job's wall time (submit to
finished_at) spent in the last 14 % of the bar (14 % if the bar tracks time). The model loads (and auto measures
its arithmetic) before the job is submitted, so neither is in the times. Timings are as noisy as the machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from whisper_flask import create_app  # noqa: E402
from whisper_flask.access.control import UNRESTRICTED  # noqa: E402
from whisper_flask.engine.checkpoints import ensure_checkpoint  # noqa: E402
from whisper_flask.engine.options import TranscribeOptions  # noqa: E402
from whisper_flask.extension import get_service  # noqa: E402
from whisper_flask.jobs.records import Submission  # noqa: E402
from whisper_flask.jobs.serialize import job_body  # noqa: E402

SPEECH = ROOT.parent / "shared" / "speech" / "en" / "long" / "kathleen_arctic_a0061_a0140_concat.wav"
MARKS = tuple(range(10, 100, 10))
#: Samples from this percentage on are held to the issue's bound (the ETA within 25 % of the real time left).
FROM_PERCENT = 20.0
#: Samples with less time left than this are also left out of a second worst (see report).
SETTLED_S = 1.0
#: The last stretch of the bar whose share of the wall time is reported (the issue saw 43 % of it there).
TAIL_PERCENT = 14.0


@dataclass(frozen=True)
class Sample:
    """The job as one poll saw it, `at` seconds after the submit."""

    at: float
    status: str
    stage: str
    progress: float
    eta: float | None


def run_job(work: Path, model: str, speech: Path, quantize: str, interval: float) -> tuple[list[Sample], float]:
    """Transcribe `speech` in the service in this process; the polls and the job's wall seconds (submit to end)."""
    config: dict[str, Any] = {
        "MODEL": model,
        "MODEL_DIR": work / "models",
        "MODEL_DOWNLOAD": False,
        "AUTH": "off",
        "UPLOAD_DIR": work / "run" / "uploads",
        "TRANSCRIPT_DIR": work / "run" / "transcripts",
        "LOG_DIR": work / "run" / "logs",
        "QUANTIZE": quantize,
    }
    service = get_service(create_app(config))
    service.start()
    samples: list[Sample] = []
    try:
        service.parts.engine.wait_until_ready(600)  # type: ignore[attr-defined]
        shutil.copyfile(speech, service.settings.UPLOAD_DIR / "bench.upload")  # as a finished upload
        started_at, started = datetime.now(timezone.utc), time.monotonic()
        job_id = service.submit("bench.upload", Submission(speech.name, TranscribeOptions(), UNRESTRICTED.name)).job.id
        while True:
            view = service.parts.registry.view(job_id)
            body = job_body(view, {})
            samples.append(Sample(time.monotonic() - started, body["status"], body["stage"], body["progress"],
                                  body["eta_seconds"]))  # fmt: skip
            if view.job.status.terminal:
                break
            time.sleep(interval)
        if view.job.status.value != "completed":
            raise RuntimeError(f"job {job_id} {view.job.status.value}: {view.job.error}")
        total = (datetime.fromisoformat(str(view.job.finished_at)) - started_at).total_seconds()
    finally:
        service.stop()
    return samples, total


def report(samples: list[Sample], total: float) -> list[str]:
    """The table at each mark, the worst ratio from FROM_PERCENT on, and the tail's share of the time."""
    running = [sample for sample in samples if sample.status == "in_progress"]
    lines = [f"{'mark':>5} {'shown':>6} {'at s':>6} {'eta s':>6} {'real s':>6} {'eta/real':>8}"]
    for mark in MARKS:
        sample = next((s for s in running if s.progress >= mark), None)
        if sample is None:
            lines.append(f"{mark:>4}% {'(never shown)':>22}")
            continue
        real = total - sample.at
        eta = "-" if sample.eta is None else f"{sample.eta:.1f}"
        ratio = "-" if sample.eta is None or real <= 0 else f"{sample.eta / real:.2f}"
        lines.append(f"{mark:>4}% {sample.progress:>6.1f} {sample.at:>6.1f} {eta:>6} {real:>6.1f} {ratio:>8}")
    held = [s for s in running if s.progress >= FROM_PERCENT and total - s.at > 0]
    errors = [(abs(s.eta - (total - s.at)) / (total - s.at), s) for s in held if s.eta is not None]
    missing = len(held) - len(errors)
    # In the last second the ETA's 0.1 s rounding and the poll's own timing decide the ratio: shown apart.
    for name, chosen in (
        ("", errors),
        (f", {SETTLED_S:.0f} s or more left", [e for e in errors if total - e[1].at >= SETTLED_S]),
    ):
        if not chosen:
            continue
        worst, at = max(chosen, key=lambda pair: pair[0])
        within = sum(error <= 0.25 for error, _ in chosen)
        lines.append(
            f"from {FROM_PERCENT:.0f} % on{name}: worst |eta - real| / real {worst:.2f} (at {at.progress:.1f} %, "
            f"eta {at.eta} s, real {total - at.at:.1f} s); within 25 %: {within} of {len(chosen)} samples"
        )
    lines.append(f"samples from {FROM_PERCENT:.0f} % on with no ETA: {missing}")
    tail = next((s.at for s in running if s.progress >= 100 - TAIL_PERCENT), None)
    if tail is not None:
        share = (total - tail) / total
        lines.append(f"share of the wall time in the last {TAIL_PERCENT:.0f} % of the bar: {share:.0%}")
    return lines


def main() -> None:
    """Load the model, run the job while polling it, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--speech", type=Path, default=SPEECH, help="the recording to transcribe")
    parser.add_argument("--quantize", default="auto", help="the service's QUANTIZE setting")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between polls")
    parser.add_argument("--work", type=Path, help="a directory for the model and the run (default: a new one)")
    parser.add_argument("--samples", action="store_true", help="also print every sample")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    work = args.work or Path(tempfile.mkdtemp(prefix="whisper-eta-"))
    shutil.rmtree(work / "run", ignore_errors=True)  # each run's job starts from nothing (no resume state)
    ensure_checkpoint(args.model, work / "models", allow_download=False)
    samples, total = run_job(work, args.model, args.speech, args.quantize, args.interval)
    out = [
        f"model {args.model}, QUANTIZE={args.quantize}, {args.speech.name}; {os.cpu_count()} CPUs, load average"
        f" {load:.2f} at the start; job {total:.1f} s from submit to finished_at; polled every {args.interval} s"
    ]
    if args.samples:
        out += [f"{s.at:7.2f} {s.stage:<14} {s.progress:5.1f} {s.eta}" for s in samples]
    print("\n".join(out + report(samples, total)))  # noqa: T201


if __name__ == "__main__":
    main()
