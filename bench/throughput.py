"""Aggregate throughput of concurrent jobs against bare openai-whisper and faster-whisper, in one run.

    .venv/bin/pip install -r bench/requirements.txt   # faster-whisper, for this benchmark only
    .venv/bin/python bench/throughput.py [--model base] [--files 8] [--seconds 45] [--rounds 1]

On the same speech (espeak-ng passages with known text, English) and the same weights (the model's
registry pack: converted for openai-whisper, as shipped for faster-whisper), it measures
audio-seconds per wall-second of:

1. bare `whisper.transcribe`, the files one after another (fp32);
2. the service with all files uploaded at once (MAX_WORKERS = files), QUANTIZE=none and int8,
   from the first upload to the last job's end (one job's latency: bench/overhead.py);
3. faster-whisper, the files one after another, float32 and int8, with openai-whisper's
   defaults (greedy, the same temperature fallback and thresholds).

Each run is a fresh process (bench/isolation.py); with --rounds N the runs take turns N times and
the median wall time counts. Each transcript's word error rate against the passage text is
reported beside it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import whisper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.isolation import measure_apart, report  # noqa: E402
from bench.overhead import serve, transcribe_bare  # noqa: E402
from bench.peers import ct2_model_dir, speech_passages, transcribe_faster_whisper, word_error_rate  # noqa: E402
from whisper_flask.engine.checkpoints import ensure_checkpoint  # noqa: E402

RUNS = ("bare", "service-none", "service-int8", "faster-whisper-float32", "faster-whisper-int8")
NAMES = {
    "bare": "openai-whisper bare, sequential",
    "service-none": "service, all at once, QUANTIZE=none",
    "service-int8": "service, all at once, QUANTIZE=int8",
    "faster-whisper-float32": "faster-whisper float32, sequential",
    "faster-whisper-int8": "faster-whisper int8, sequential",
}


def measure(run: str, work: Path, model: str, paths: list[Path]) -> tuple[float, list[str]]:
    """One run, in this process: (wall seconds, texts)."""
    if run == "bare":
        return transcribe_bare(work, model, paths, language="en")
    if run.startswith("service-"):
        return serve(work, model, paths, len(paths), run.removeprefix("service-"), "txt", language="en")
    texts, seconds = transcribe_faster_whisper(
        ct2_model_dir(model, work), paths, run.removeprefix("faster-whisper-"), torch.get_num_threads()
    )
    return seconds, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--files", type=int, default=8, help="speech files, and concurrent jobs")
    parser.add_argument("--seconds", type=float, default=45.0, help="length of each file (30 to 60)")
    parser.add_argument("--rounds", type=int, default=1, help="times each run is repeated, in turns")
    parser.add_argument("--measure", nargs=2, metavar=("RUN", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        run, work = args.measure[0], Path(args.measure[1])
        paths = [work / f"passage-{i}.wav" for i in range(args.files)]
        seconds, run_texts = measure(run, work, args.model, paths)
        report({"seconds": seconds, "texts": run_texts})
        return

    work = Path(tempfile.mkdtemp(prefix="whisper-throughput-"))
    ensure_checkpoint(args.model, work / "models", allow_download=False)
    passages = speech_passages(work, args.files, args.seconds)
    references = [text for _, text in passages]
    audio_seconds = sum(whisper.load_audio(str(path)).shape[0] / whisper.audio.SAMPLE_RATE for path, _ in passages)

    walls: dict[str, list[float]] = {run: [] for run in RUNS}
    texts: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for run in RUNS:
            result = measure_apart(Path(__file__), ["--model", args.model, "--files", str(args.files)], run, str(work))
            walls[run].append(result["seconds"])
            texts[run] = result["texts"]

    speed = {run: audio_seconds / statistics.median(walls[run]) for run in RUNS}
    out = [
        f"model {args.model}, {args.files} files, {audio_seconds:.0f} s of speech, {args.rounds} round(s)",
        f"{'':38} {'wall s':>7} {'audio-s/s':>9} {'x bare':>7} {'x fw int8':>9} {'WER %':>6}  runs",
    ]
    for run in RUNS:
        wer = statistics.mean(word_error_rate(ref, text) for ref, text in zip(references, texts[run], strict=True))
        x_bare, x_peer = speed[run] / speed["bare"], speed[run] / speed["faster-whisper-int8"]
        out.append(
            f"{NAMES[run]:38} {statistics.median(walls[run]):7.2f} {speed[run]:9.2f} {x_bare:7.2f} {x_peer:9.2f}"
            f" {100 * wer:6.2f}  {[round(w, 1) for w in walls[run]]}"
        )
    print("\n".join(out))  # noqa: T201


if __name__ == "__main__":
    main()
