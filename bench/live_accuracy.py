"""Live text's word error rate on real speech fed at real-time pace, against the same audio as a file.

    .venv/bin/python bench/live_accuracy.py [--model base] [--sets utterances,chapter,long] [--speech DIR]
                                            [--encoder none] [--decoder fp16]

Each recording is fed to its own LiveStream (engine/live.py) 100 ms at a time, on a real model thread in this
process, as a session that keeps up hears it: no network and no clock, so a run's text is the same every time on
one CPU. The stream is then ended as a client's end would. Sets:

- utterances: every en/utt/*/*.wav with a .txt beside it in --speech (97 short sentences), each its own session;
- chapter: the 70 s LJ Speech chapter in tests/fixtures (bench/live.py's recording);
- long: each en/long/*_concat.wav (about 4 minutes each, many sentences and pauses).

"file" is bare whisper.transcribe() on the same weights in fp32, greedy with its temperature fallback, English.
Word error rates are over each set's words (bench/long_file.corpus_wer, Whisper's English normaliser). The live
arithmetic defaults to what QUANTIZE=auto chose on an AVX2-only CPU (fp32 encoder, fp16-weight decoder: fp32's
results up to summation order); bench/live.py measures the delays through gunicorn.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import whisper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.long_file import corpus_wer  # noqa: E402
from tests.servers import FIXTURES  # noqa: E402
from whisper_flask.engine.batching import ModelThread, use_torch_threads  # noqa: E402
from whisper_flask.engine.checkpoints import ensure_checkpoint  # noqa: E402
from whisper_flask.engine.live import LiveEventKind, LiveStream  # noqa: E402
from whisper_flask.engine.live_window import LiveDecoder  # noqa: E402
from whisper_flask.engine.options import Task  # noqa: E402
from whisper_flask.engine.quantize import AppliedArithmetic, StageArithmetic, apply_arithmetic  # noqa: E402
from whisper_flask.engine.speech import SpeechDetector  # noqa: E402

PIECE = 1600  # 100 ms at 16 kHz, as bench/live.py's client sends


def recordings(name: str, speech: Path) -> list[Path]:
    """The set's audio files, each with its reference beside it as .txt."""
    if name == "utterances":
        found = sorted(speech.glob("en/utt/*/*.wav"))
    elif name == "long":
        found = sorted(speech.glob("en/long/*_concat.wav"))
    elif name == "chapter":
        found = [FIXTURES / "lj001-chapter-70s.opus"]
    else:
        raise SystemExit(f"unknown set {name!r}")
    return [path for path in found if path.with_suffix(".txt").is_file()]


def live_text(
    model: whisper.Whisper, applied: AppliedArithmetic, thread: ModelThread, detector: SpeechDetector, audio: np.ndarray
) -> str:
    """The final text of one session fed `audio` a piece at a time, then ended."""
    decoder = LiveDecoder(model, thread, "en", Task.TRANSCRIBE, encoder=applied.live_encoder)
    stream = LiveStream(decoder, detector.stream_detector())
    events = []
    for start in range(0, len(audio), PIECE):
        events += stream.feed(audio[start : start + PIECE])
    events += stream.commit()
    return "".join(event.text for event in events if event.kind is LiveEventKind.FINAL)


def main() -> None:
    """Each set's live and file word error rates, one line a set."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--sets", default="utterances,chapter,long")
    parser.add_argument("--speech", type=Path, default=ROOT.parent / "shared" / "speech")
    parser.add_argument("--encoder", default="none", help="the live encoder's arithmetic (quantize.py)")
    parser.add_argument("--decoder", default="fp16", help="the live decoder's arithmetic (quantize.py)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # whisper's FP16-on-CPU notice, once per file
    checkpoint = str(ensure_checkpoint(args.model, Path("~/.cache/whisper").expanduser(), allow_download=False))
    bare = whisper.load_model(checkpoint)
    live = whisper.load_model(checkpoint)
    applied = apply_arithmetic(live, StageArithmetic(args.encoder, args.decoder, args.encoder))
    detector = SpeechDetector(30)
    detector.load()
    thread = ModelThread(8, wait_s=0.05)
    thread.start(live, applied.projection)
    use_torch_threads(1)  # the session's own thread, as the service runs it
    try:
        for name in args.sets.split(","):
            paths = recordings(name, args.speech)
            references = [path.with_suffix(".txt").read_text() for path in paths]
            audios = [whisper.load_audio(str(path)) for path in paths]
            started = time.perf_counter()
            live_texts = [live_text(live, applied, thread, detector, audio) for audio in audios]
            live_s = time.perf_counter() - started
            use_torch_threads(2)
            file_texts = [str(whisper.transcribe(bare, audio, language="en", fp16=False)["text"]) for audio in audios]
            use_torch_threads(1)
            print(  # noqa: T201
                f"{name}: {len(paths)} recordings, {sum(map(len, audios)) / 16000:.0f} s;"
                f" word error rate live {100 * corpus_wer(references, live_texts):.2f} %"
                f" ({live_s:.0f} s), file {100 * corpus_wer(references, file_texts):.2f} %",
                flush=True,
            )
    finally:
        thread.stop()


if __name__ == "__main__":
    main()
