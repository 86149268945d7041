"""Aggregate throughput of concurrent jobs against bare openai-whisper and faster-whisper, in one run.

    .venv/bin/pip install -r bench/requirements.txt   # faster-whisper, for this benchmark only
    .venv/bin/python bench/throughput.py [--model base] [--files 8] [--seconds 45]

On the same speech (espeak-ng passages with known text, English) and the same weights (the model's
registry pack: converted for openai-whisper, as shipped for faster-whisper), it measures
audio-seconds per wall-second of:

1. bare `whisper.transcribe`, the files one after another (fp32);
2. the service with all files uploaded at once (MAX_WORKERS = files), QUANTIZE=none and int8,
   from the first upload to the last job's end (one job's latency: bench/overhead.py);
3. faster-whisper, the files one after another, float32 and int8, with openai-whisper's
   defaults (greedy, the same temperature fallback and thresholds).

Each transcript's word error rate against the passage text is reported beside it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import whisper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.overhead import make_app, seconds_between, submit, wait  # noqa: E402
from bench.peers import ct2_model_dir, speech_passages, transcribe_faster_whisper, word_error_rate  # noqa: E402
from whisper_flask.checkpoints import ensure_checkpoint  # noqa: E402


def serve(work: Path, model: str, model_dir: Path, paths: list[Path], quantize: str) -> tuple[float, list[str]]:
    """All files at once through the service: (wall seconds, texts)."""
    app = make_app(work / quantize, model, model_dir, len(paths), QUANTIZE=quantize)
    client = app.test_client()
    ids = [submit(client, path, language="en") for path in paths]
    # Rare polls (the records' own times are the measure), so polling steals no CPU from the jobs.
    records = [wait(client, job_id, poll_s=0.5) for job_id in ids]
    wall = seconds_between(min(r["created_at"] for r in records), max(r["finished_at"] for r in records))
    texts = [client.get(f"/download/{job_id}.txt").get_data(as_text=True) for job_id in ids]
    app.extensions["whisper_flask"].shutdown()
    return wall, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--files", type=int, default=8, help="speech files, and concurrent jobs")
    parser.add_argument("--seconds", type=float, default=45.0, help="length of each file (30 to 60)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="whisper-throughput-"))
    model_dir = work / "models"
    checkpoint = ensure_checkpoint(args.model, model_dir, allow_download=False)
    passages = speech_passages(work, args.files, args.seconds)
    paths, references = [path for path, _ in passages], [text for _, text in passages]
    audio_seconds = sum(whisper.load_audio(str(path)).shape[0] / whisper.audio.SAMPLE_RATE for path in paths)
    threads = torch.get_num_threads()

    rows: list[tuple[str, float, list[str]]] = []
    bare_model = whisper.load_model(str(checkpoint), device="cpu")
    started = time.perf_counter()
    bare_texts = [whisper.transcribe(bare_model, str(path), language="en", fp16=False)["text"] for path in paths]
    rows.append(("openai-whisper bare, sequential", time.perf_counter() - started, bare_texts))
    del bare_model

    for quantize in ("none", "int8"):
        wall, texts = serve(work, args.model, model_dir, paths, quantize)
        rows.append((f"service, {args.files} at once, QUANTIZE={quantize}", wall, texts))

    ct2 = ct2_model_dir(args.model, work)
    for compute_type in ("float32", "int8"):
        texts, seconds = transcribe_faster_whisper(ct2, paths, compute_type, threads)
        rows.append((f"faster-whisper {compute_type}, sequential", seconds, texts))

    bare_speed = audio_seconds / rows[0][1]
    peer_speed = audio_seconds / rows[-1][1]
    out = [
        f"model {args.model}, {args.files} files, {audio_seconds:.0f} s of speech, torch threads {threads}",
        f"{'':42} {'wall s':>7} {'audio-s/s':>9} {'x bare':>7} {'x fw int8':>9} {'WER %':>6}",
    ]
    for name, seconds, texts in rows:
        speed = audio_seconds / seconds
        wer = statistics.mean(word_error_rate(ref, text) for ref, text in zip(references, texts, strict=True))
        x_bare, x_peer = speed / bare_speed, speed / peer_speed
        out.append(f"{name:42} {seconds:7.2f} {speed:9.2f} {x_bare:7.2f} {x_peer:9.2f} {100 * wer:6.2f}")
    print("\n".join(out))  # noqa: T201


if __name__ == "__main__":
    main()
