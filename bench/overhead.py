"""Service overhead and concurrency, measured side by side with bare openai-whisper in one run.

    .venv/bin/python bench/overhead.py [--model base] [--seconds 60] [--repeat 3] [--quantize none]

1. Latency of one job: `whisper.transcribe(model, path)` directly, against the whole service path
   (multipart upload, SQLite record, ffmpeg decode, engine, five transcript files), measured from the
   upload to the job's `finished_at`. Runs alternate so machine drift hits both alike, each in a
   fresh process (bench/isolation.py).
2. Four jobs through the service one by one (queued, MAX_WORKERS=1) against all at once (MAX_WORKERS=4):
   aggregate audio-seconds per wall-second, and whether the transcripts are byte-identical.
"""

from __future__ import annotations

import argparse
import json
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

from bench.isolation import measure_apart, report  # noqa: E402
from bench.peers import joined_speech, speech_passages  # noqa: E402
from whisper_flask import create_app  # noqa: E402
from whisper_flask.engine.checkpoints import ensure_checkpoint  # noqa: E402
from whisper_flask.extension import get_service  # noqa: E402

#: Jobs in the concurrency measure, each its own rotation of the passages.
FILES = 4


def make_client(work: Path, model: str, model_dir: Path, workers: int, **config: Any) -> Any:
    """A test client of a real service on `model`, ready to transcribe, with an API key; `config` adds settings."""
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
    service = get_service(app)
    key = service.parts.keys.create("bench", admin=True)
    service.start()
    service.parts.engine.wait_until_ready(300)  # type: ignore[attr-defined]
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    return client


def submit(client: Any, path: Path, **fields: str) -> str:
    """Upload a file; return the job id."""
    with path.open("rb") as audio:
        response = client.post("/upload", data={"file": (audio, path.name), **fields})
        return str(response.get_json()["transcription_id"])


def wait(client: Any, job_id: str, poll_s: float) -> dict[str, Any]:
    """Poll until the job completed; return its record."""
    while True:
        record: dict[str, Any] = client.get(f"/jobs/{job_id}").get_json()
        if record["status"] in ("completed", "failed", "cancelled"):
            assert record["status"] == "completed", record
            return record
        time.sleep(poll_s)


def seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def transcribe_bare(work: Path, model: str, paths: list[Path], **options: Any) -> tuple[float, list[str]]:
    """Bare `whisper.transcribe` on each file in turn (fp32, CPU): (seconds, texts)."""
    bare_model = whisper.load_model(str(ensure_checkpoint(model, work / "models", allow_download=False)), device="cpu")
    started = time.perf_counter()
    texts = [whisper.transcribe(bare_model, str(path), fp16=False, **options)["text"] for path in paths]
    return time.perf_counter() - started, texts


def serve(
    work: Path, model: str, paths: list[Path], workers: int, quantize: str, fmt: str, **fields: str
) -> tuple[float, list[str]]:
    """Upload every file at once to a fresh service: (first upload to last job's end in s, transcripts in fmt)."""
    client = make_client(work / f"service-{time.time_ns()}", model, work / "models", workers, QUANTIZE=quantize)
    ids = [submit(client, path, **fields) for path in paths]
    # Rare polls (the records' own times are the measure), so polling steals no CPU from the jobs.
    records = [wait(client, job_id, poll_s=0.5) for job_id in ids]
    wall = seconds_between(min(r["created_at"] for r in records), max(r["finished_at"] for r in records))
    transcripts = [client.get(f"/download/{job_id}.{fmt}").get_data(as_text=True) for job_id in ids]
    get_service(client.application).stop()
    return wall, transcripts


def measure(run: str, work: Path, model: str, quantize: str, files: list[Path]) -> dict[str, Any]:
    """One run, in this process."""
    if run == "bare":
        seconds, [text] = transcribe_bare(work, model, files[:1])
        return {"seconds": seconds, "text": text}
    if run == "one":
        seconds, [transcript] = serve(work, model, files[:1], 1, quantize, "json")
        return {"seconds": seconds, "text": json.loads(transcript)["text"]}
    # One worker runs the queued jobs one by one; as many workers as files run them at once.
    seconds, srts = serve(work, model, files, len(files) if run == "together" else 1, quantize, "srt")
    return {"seconds": seconds, "srts": srts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each speech file")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quantize", default="none", help="the service's QUANTIZE (auto, none, int8)")
    parser.add_argument("--measure", nargs=2, metavar=("RUN", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        work = Path(args.measure[1])
        files = [work / f"speech-{i}.wav" for i in range(FILES)]
        report(measure(args.measure[0], work, args.model, args.quantize, files))
        return

    work = Path(tempfile.mkdtemp(prefix="whisper-bench-"))
    ensure_checkpoint(args.model, work / "models", allow_download=False)
    passages = [path for path, _ in speech_passages(work / "passages", FILES, 45)]
    for i in range(FILES):
        joined_speech(work / f"speech-{i}.wav", args.seconds, passages[i:] + passages[:i])
    options = ["--model", args.model, "--seconds", str(args.seconds), "--quantize", args.quantize]

    bare, served = [], []
    for _ in range(args.repeat):
        bare_run = measure_apart(Path(__file__), options, "bare", str(work))
        served_run = measure_apart(Path(__file__), options, "one", str(work))
        bare.append(bare_run["seconds"])
        served.append(served_run["seconds"])
    alone = measure_apart(Path(__file__), options, "sequential", str(work))
    together = measure_apart(Path(__file__), options, "together", str(work))

    audio_total = args.seconds * FILES
    bare_median, served_median = statistics.median(bare), statistics.median(served)
    seconds_alone, seconds_together = alone["seconds"], together["seconds"]
    out = [
        f"model {args.model}, {args.seconds:.0f} s files, {args.repeat} alternating runs, QUANTIZE={args.quantize}",
        f"bare whisper.transcribe   median {bare_median:6.2f} s  runs {[round(x, 2) for x in bare]}",
        f"service, upload->finished median {served_median:6.2f} s  runs {[round(x, 2) for x in served]}",
        f"service / bare latency ratio: {served_median / bare_median:.3f}",
        f"same text as bare whisper: {served_run['text'] == bare_run['text']}",
        f"{FILES} jobs one by one: {seconds_alone:6.2f} s = {audio_total / seconds_alone:5.1f} audio-s/s",
        f"{FILES} jobs at once:    {seconds_together:6.2f} s = {audio_total / seconds_together:5.1f} audio-s/s",
        f"concurrent / sequential throughput ratio: {seconds_alone / seconds_together:.3f}",
        f"concurrent transcripts byte-identical to one-by-one: {together['srts'] == alone['srts']}",
    ]
    print("\n".join(out))  # noqa: T201


if __name__ == "__main__":
    main()
