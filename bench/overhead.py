"""Service overhead and concurrency, measured side by side with bare openai-whisper in one run.

    .venv/bin/python bench/overhead.py [--model base] [--seconds 60] [--repeat 3] [--quantize none]

1. Latency of one job: `whisper.transcribe(model, path)` directly, against the whole service path
   (multipart upload, SQLite record, ffmpeg decode, engine, five transcript files), measured from the
   upload to the job's `finished_at`. Runs alternate so machine drift hits both alike.
2. Four jobs through the service one by one (MAX_WORKERS=1) against all at once (MAX_WORKERS=4):
   aggregate audio-seconds per wall-second, and whether the transcripts are byte-identical.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import whisper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import SPOKEN  # noqa: E402
from tests.test_end_to_end import speech  # noqa: E402
from whisper_flask import create_app  # noqa: E402
from whisper_flask.checkpoints import ensure_checkpoint  # noqa: E402


def make_app(work: Path, model: str, model_dir: Path, workers: int, **config: Any) -> Any:
    """A real service on `model`, ready to transcribe; `config` adds or overrides settings."""
    app = create_app(
        {
            "MODEL": model,
            "MODEL_DIR": model_dir,
            "MODEL_DOWNLOAD": False,
            "UPLOAD_DIR": work / "uploads",
            "TRANSCRIPT_DIR": work / f"transcripts-{workers}",
            "LOG_DIR": work / "logs",
            "MAX_WORKERS": workers,
            **config,
        }
    )
    app.extensions["whisper_flask"].engine.wait_until_ready(300)
    return app


def submit(client: Any, path: Path, **fields: str) -> str:
    """Upload a file; return the job id."""
    with path.open("rb") as audio:
        response = client.post("/upload", data={"file": (audio, path.name), **fields})
        return str(response.get_json()["transcription_id"])


def wait(client: Any, job_id: str, poll_s: float = 0.01) -> dict[str, Any]:
    """Poll until the job completed; return its record."""
    while True:
        record: dict[str, Any] = client.get(f"/jobs/{job_id}").get_json()
        if record["status"] in ("completed", "failed", "cancelled"):
            assert record["status"] == "completed", record
            return record
        time.sleep(poll_s)


def seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each speech file")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quantize", default="none", help="the service's QUANTIZE (auto, none, int8)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="whisper-bench-"))
    model_dir = work / "models"
    checkpoint = ensure_checkpoint(args.model, model_dir, allow_download=False)
    names = list(SPOKEN)
    files = [speech(work / f"speech-{i}.wav", args.seconds, names[i:] + names[:i]) for i in range(len(names))]

    bare_model = whisper.load_model(str(checkpoint), device="cpu")
    app = make_app(work, args.model, model_dir, workers=1, QUANTIZE=args.quantize)
    client = app.test_client()
    bare, served = [], []
    for _ in range(args.repeat):
        started = time.perf_counter()
        bare_text = whisper.transcribe(bare_model, str(files[0]), fp16=False)["text"]
        bare.append(time.perf_counter() - started)
        record = wait(client, submit(client, files[0]))
        served.append(seconds_between(record["created_at"], record["finished_at"]))
    served_text = client.get(f"/download/{record['transcription_id']}.json").get_json()["text"]

    alone_started = time.perf_counter()
    alone_ids = []
    for path in files:
        alone_ids.append(submit(client, path))
        wait(client, alone_ids[-1])
    alone_wall = time.perf_counter() - alone_started
    alone_texts = [client.get(f"/download/{job_id}.srt").get_data() for job_id in alone_ids]
    app.extensions["whisper_flask"].shutdown()

    app4 = make_app(work, args.model, model_dir, workers=len(files), QUANTIZE=args.quantize)
    client4 = app4.test_client()
    together_started = time.perf_counter()
    together_ids = [submit(client4, path) for path in files]
    for job_id in together_ids:
        wait(client4, job_id)
    together_wall = time.perf_counter() - together_started
    together_texts = [client4.get(f"/download/{job_id}.srt").get_data() for job_id in together_ids]
    app4.extensions["whisper_flask"].shutdown()

    audio_total = args.seconds * len(files)
    bare_median, served_median = statistics.median(bare), statistics.median(served)
    print(f"model {args.model}, {args.seconds:.0f} s speech files, {args.repeat} alternating runs")  # noqa: T201
    print(f"bare whisper.transcribe   median {bare_median:6.2f} s  runs {[round(x, 2) for x in bare]}")  # noqa: T201
    print(f"service, upload->finished median {served_median:6.2f} s  runs {[round(x, 2) for x in served]}")  # noqa: T201
    print(f"service / bare latency ratio: {served_median / bare_median:.3f}")  # noqa: T201
    print(f"same text as bare whisper: {served_text == bare_text}")  # noqa: T201
    print(f"{len(files)} jobs one by one: {alone_wall:6.2f} s = {audio_total / alone_wall:5.1f} audio-s/s")  # noqa: T201
    print(f"{len(files)} jobs at once:    {together_wall:6.2f} s = {audio_total / together_wall:5.1f} audio-s/s")  # noqa: T201
    print(f"concurrent / sequential throughput ratio: {alone_wall / together_wall:.3f}")  # noqa: T201
    print(f"concurrent transcripts byte-identical to one-by-one: {together_texts == alone_texts}")  # noqa: T201


if __name__ == "__main__":
    main()
