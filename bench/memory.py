"""Memory of long jobs, measured side by side with bare openai-whisper in one run.

    .venv/bin/python bench/memory.py [--model tiny.en] [--hours 2] [--jobs 8]

Each measurement runs in a fresh interpreter (bench/isolation.py), loads the model, then resets
the kernel's peak-RSS mark (/proc/self/clear_refs), so each figure is the peak resident memory
above the loaded model:

- bare: `whisper.transcribe(model, path, clip_timestamps="0,60")`: Whisper's own path, which
  decodes the whole file to float32 and computes its whole spectrogram before its first window;
  the clip keeps the model's work to two windows.
- service, 1 job and `--jobs` jobs at once: the service's pipeline on the same file (probe, decode
  to disk, chunked spectrogram, windows), each job cancelled once it is past its first window.

It also times ffmpeg decoding one hour of MP3 (the figure behind media.DECODE_S_PER_AUDIO_S).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import whisper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.isolation import measure_apart, report  # noqa: E402
from bench.peers import joined_speech, speech_passages  # noqa: E402
from whisper_flask import create_app  # noqa: E402
from whisper_flask.access.control import UNRESTRICTED  # noqa: E402
from whisper_flask.audio.subprocesses import media_tool  # noqa: E402
from whisper_flask.engine.checkpoints import ensure_checkpoint  # noqa: E402
from whisper_flask.engine.options import TranscribeOptions  # noqa: E402
from whisper_flask.extension import get_service  # noqa: E402
from whisper_flask.jobs.records import Submission  # noqa: E402


def rss_mb(field: str) -> float:
    """This process's VmRSS or VmHWM in MB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1]) / 1024


def reset_peak() -> float:
    """Reset the peak-RSS mark to the current RSS and return that."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss_mb("VmRSS")


def measure_bare(work: Path, model_name: str, audio: Path) -> dict[str, Any]:
    """Peak RSS above the loaded model of Whisper's transcribe on the whole file."""
    model = whisper.load_model(str(ensure_checkpoint(model_name, work / "models", allow_download=False)))
    base = reset_peak()
    whisper.transcribe(model, str(audio), clip_timestamps="0,60", fp16=False)
    return {"peak_above_model_mb": rss_mb("VmHWM") - base}


def measure_service(work: Path, model_name: str, audio: Path, jobs: int) -> dict[str, Any]:
    """Peak RSS above the loaded model of `jobs` jobs on the file at once, each until past its first window."""
    app = create_app({"MODEL": model_name, "MODEL_DIR": work / "models", "MODEL_DOWNLOAD": False, "AUTH": "off",
                      "UPLOAD_DIR": work / f"uploads-{jobs}", "TRANSCRIPT_DIR": work / f"transcripts-{jobs}",
                      "LOG_DIR": work / "logs", "MAX_WORKERS": jobs, "MAX_QUEUED_JOBS": jobs})  # fmt: skip
    service = get_service(app)
    service.start()
    service.parts.engine.wait_until_ready(300)  # type: ignore[attr-defined]
    base = reset_peak()
    started = time.monotonic()
    ids = []
    for n in range(jobs):
        name = f"long-{n}.upload"
        os.link(audio, service.settings.UPLOAD_DIR / name)  # as a finished upload: the file itself, no copy
        ids.append(service.submit(name, Submission("long.wav", TranscribeOptions(), UNRESTRICTED.name)).job.id)
    waiting = set(ids)
    while waiting:
        for job_id in list(waiting):
            job = service.parts.registry.view(job_id).job
            assert job.status.value in ("pending", "in_progress"), job
            if job.processed_seconds > 0:
                service.cancel(job_id, UNRESTRICTED)
                waiting.discard(job_id)
        time.sleep(0.2)
    seconds = time.monotonic() - started
    service.stop()
    return {"peak_above_model_mb": rss_mb("VmHWM") - base, "seconds_to_first_windows": seconds}


def ffmpeg_seconds_per_hour(work: Path, audio: Path) -> float:
    """Wall seconds for ffmpeg to decode one hour of 32 kbit/s MP3 to 16 kHz int16, as the service does."""
    mp3 = work / "hour.mp3"
    subprocess.run([media_tool("ffmpeg"), "-v", "error", "-y", "-i", str(audio), "-t", "3600", "-ar", "44100",
                    "-b:a", "32k", str(mp3)], check=True)  # fmt: skip
    started = time.monotonic()
    subprocess.run([media_tool("ffmpeg"), "-v", "error", "-i", str(mp3), "-ac", "1", "-ar", "16000", "-f", "s16le",
                    "-acodec", "pcm_s16le", "-y", "/dev/null"], check=True)  # fmt: skip
    return time.monotonic() - started


def main() -> None:
    """Prepare the long file, then measure bare whisper and the service each in a fresh process."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--work")
    parser.add_argument("--measure", nargs="+")
    args = parser.parse_args()
    if args.measure:
        work, kind = Path(args.work), args.measure[0]
        audio = work / "long.wav"
        if kind == "bare":
            report(measure_bare(work, args.model, audio))
        else:
            report(measure_service(work, args.model, audio, int(args.measure[1])))
        return

    work = Path(tempfile.mkdtemp(prefix="whisper-memory-"))
    passages = [path for path, _ in speech_passages(work / "passages", 5, 45)]
    audio = joined_speech(work / "long.wav", args.hours * 3600, passages)
    options = ["--model", args.model, "--work", str(work)]
    bare = measure_apart(Path(__file__), options, "bare")
    one = measure_apart(Path(__file__), options, "service", "1")
    many = measure_apart(Path(__file__), options, "service", str(args.jobs))
    decode = ffmpeg_seconds_per_hour(work, audio)
    print(f"model {args.model}, {args.hours:g} h of speech; peak RSS above the loaded model:")  # noqa: T201
    print(f"  bare whisper.transcribe, 1 job : {bare['peak_above_model_mb']:8.0f} MB")  # noqa: T201
    print(f"  service, 1 job                 : {one['peak_above_model_mb']:8.0f} MB"  # noqa: T201
          f"  ({one['peak_above_model_mb'] / bare['peak_above_model_mb']:.2f}x bare)")  # fmt: skip
    print(f"  service, {args.jobs} jobs at once        : {many['peak_above_model_mb']:8.0f} MB"  # noqa: T201
          f"  ({many['peak_above_model_mb'] / args.jobs:.0f} MB a job;"
          f" {many['seconds_to_first_windows']:.0f} s to every job's first window)")  # fmt: skip
    print(f"ffmpeg decodes 1 h of MP3 in {decode:.1f} s ({decode / 3600:.4f} s per audio second)")  # noqa: T201


if __name__ == "__main__":
    main()
