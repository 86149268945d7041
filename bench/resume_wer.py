"""Resumed against uninterrupted transcripts: word error rate and time saved, in one run.

    .venv/bin/python bench/resume_wer.py [--model base] [--seconds 300] [--points 4]

Transcribes a speech file once through the engine, then, for several windows spread over the file,
interrupts a second run as that window starts (as a stop or crash would after saving its state),
resumes from the saved state, and compares the result with the uninterrupted transcript.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peers import edit_distance_rate, joined_speech, speech_passages  # noqa: E402
from whisper_flask.audio.media import MediaDecoder  # noqa: E402
from whisper_flask.engine.engine import WhisperEngine  # noqa: E402
from whisper_flask.engine.options import TranscribeOptions  # noqa: E402
from whisper_flask.engine.windows import Window  # noqa: E402
from whisper_flask.settings import Settings  # noqa: E402


class Stop(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--points", type=int, default=4, help="interruption points")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="whisper-resume-"))
    engine = WhisperEngine()
    settings = Settings.load(
        {"MODEL": args.model, "MODEL_DIR": work / "models", "DEVICE": "cpu", "MODEL_DOWNLOAD": False,
         "UPLOAD_DIR": work / "uploads", "TRANSCRIPT_DIR": work / "transcripts", "LOG_DIR": work / "logs"}
    )  # fmt: skip
    engine.start(settings)
    engine.wait_until_ready(300)
    passages = [path for path, _ in speech_passages(work / "passages", 5, 45)]
    audio = MediaDecoder(work, settings.MAX_AUDIO_HOURS * 3600).decode(
        joined_speech(work / "speech.wav", args.seconds, passages)
    )
    options = TranscribeOptions()

    windows: list[Window] = []
    started = time.perf_counter()
    full = engine.transcribe(audio, options, windows.append)
    full_time = time.perf_counter() - started
    starts = sorted({w.seek: w for w in windows if w.seek > 0}.values(), key=lambda w: w.seek)
    chosen = [starts[round(i * (len(starts) - 1) / max(1, args.points - 1))] for i in range(args.points)]

    print(f"model {args.model}, {args.seconds:.0f} s speech, uninterrupted {full_time:.1f} s")  # noqa: T201
    for target in chosen:

        def stop_at(window: Window, seek: int = target.seek) -> None:
            if window.seek == seek:
                raise Stop

        try:
            engine.transcribe(audio, options, stop_at)
        except Stop:
            pass
        started = time.perf_counter()
        resumed = engine.transcribe(audio, options, lambda w: None, target)
        resumed_time = time.perf_counter() - started
        # Raw words, not normalised: the two transcripts come from the same engine and should match exactly.
        wer = edit_distance_rate(full["text"].split(), resumed["text"].split())
        print(  # noqa: T201
            f"interrupted at {target.seconds:6.1f} s: WER {100 * wer:5.2f} %, identical {resumed == full}, "
            f"resume took {resumed_time:5.1f} s = {resumed_time / full_time:.2f} of starting over"
        )

    engine.stop()


if __name__ == "__main__":
    main()
