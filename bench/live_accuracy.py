"""Live text's word error rate on real speech fed at real-time pace, against the same audio as a file.

    .venv/bin/python bench/live_accuracy.py [--model base] [--sets utterances,chapter,long] [--speech DIR]
                                            [--encoder none] [--decoder fp16]

Each recording is fed to its own LiveStream (engine/live.py) 100 ms at a time, on a real model thread in this
process, as a session that keeps up hears it: no network and no clock, so a run's text is the same every time on
one CPU. The stream is then ended as a client's end would. Sets:

- utterances: every en/utt/*/*.wav with a .txt beside it in --speech (97 short sentences), each its own session;
- chapter: the 70 s LJ Speech chapter in tests/fixtures (bench/live.py's recording);
- long: each en/long/*_concat.wav (about 4 minutes each, many sentences and pauses);
- nonen: each nonen/<language>/ recording (13 in 9 languages), each a session given no language: how many kept
  their own language (live_window.SURE_LANGUAGE), and how many bare whisper.transcribe() detected.

"file" is bare whisper.transcribe() on the same weights in fp32, greedy with its temperature fallback, English.
Word error rates are over each set's words (bench/long_file.corpus_wer, Whisper's English normaliser). The live
arithmetic defaults to what QUANTIZE=auto chose on an AVX2-only CPU (fp32 encoder, fp16-weight decoder: fp32's
results up to summation order); --encoder bf16 is emulated where the CPU has no bf16 kernels (EmulatedBf16Linear:
the same numbers, slower). bench/live.py measures the delays through gunicorn.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import whisper
from torch import nn
from whisper.model import AudioEncoder

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.arithmetic import swap_linears  # noqa: E402
from bench.long_file import corpus_wer  # noqa: E402
from tests.helpers import stream_final_text  # noqa: E402
from tests.servers import FIXTURES  # noqa: E402
from whisper_flask.engine.batching import MODEL_THREADS, ModelThread, use_torch_threads  # noqa: E402
from whisper_flask.engine.checkpoints import ensure_checkpoint  # noqa: E402
from whisper_flask.engine.live import LiveStream  # noqa: E402
from whisper_flask.engine.live_window import LiveDecoder  # noqa: E402
from whisper_flask.engine.options import Task  # noqa: E402
from whisper_flask.engine.quantize import StageArithmetic, apply_arithmetic, onednn_bf16  # noqa: E402
from whisper_flask.engine.speech import SpeechDetector  # noqa: E402


def recordings(name: str, speech: Path) -> list[Path]:
    """The set's audio files, each with its reference beside it as .txt."""
    if name == "utterances":
        found = sorted(speech.glob("en/utt/*/*.wav"))
    elif name == "long":
        found = sorted(speech.glob("en/long/*_concat.wav"))
    elif name == "chapter":
        found = [FIXTURES / "lj001-chapter-70s.opus"]
    elif name == "nonen":
        found = sorted(path for path in speech.glob("nonen/*/*") if path.suffix != ".txt")
    else:
        raise SystemExit(f"unknown set {name!r}")
    return [path for path in found if path.with_suffix(".txt").is_file()]


def live_text(
    model: whisper.Whisper,
    encoder: AudioEncoder,
    thread: ModelThread,
    detector: SpeechDetector,
    audio: np.ndarray,
    language: str | None = "en",
) -> tuple[str, str | None]:
    """The final text of one session fed `audio` a piece at a time, then ended, and the language it kept."""
    decoder = LiveDecoder(model, thread, language, Task.TRANSCRIBE, encoder=encoder)
    return stream_final_text(LiveStream(decoder, detector.stream_detector()), audio), decoder.language


def languages_kept(bare: whisper.Whisper, session: Callable[..., tuple[str, str | None]], paths: list[Path]) -> str:
    """How many of the recordings (each in a folder named by its language) a session given no language kept in
    their language, and bare Whisper detected in theirs."""
    live, file = [], []
    for path in paths:
        audio = whisper.load_audio(str(path))
        live.append(session(audio, language=None)[1] == path.parent.name)
        use_torch_threads(MODEL_THREADS)
        file.append(whisper.transcribe(bare, audio, fp16=False)["language"] == path.parent.name)
        use_torch_threads(1)
    return f"nonen: {len(paths)} recordings; language kept right live {sum(live)}, detected right as a file {sum(file)}"


class EmulatedBf16Linear(nn.Module):
    """quantize.Bf16Linear's numbers where oneDNN has no bf16 kernels: inputs and weights rounded to bf16 and summed
    in fp32 (as oneDNN accumulates), the outputs rounded to bf16."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.weight = layer.weight.detach().to(torch.bfloat16).float()
        self.bias = None if layer.bias is None else layer.bias.detach().to(torch.bfloat16).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b in bf16's precision, computed in fp32."""
        return F.linear(x.to(torch.bfloat16).float(), self.weight, self.bias).to(torch.bfloat16).float()


def main() -> None:
    """Each set's live and file word error rates, one line a set."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--sets", default="utterances,chapter,long")
    parser.add_argument("--speech", type=Path, default=ROOT.parent / "shared" / "speech")
    parser.add_argument(
        "--encoder",
        default="none",
        help="the live encoder's arithmetic (quantize.py; bf16 is emulated where the CPU has no bf16 kernels)",
    )
    parser.add_argument("--decoder", default="fp16", help="the live decoder's arithmetic (quantize.py)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # whisper's FP16-on-CPU notice, once per file
    checkpoint = str(ensure_checkpoint(args.model, Path("~/.cache/whisper").expanduser(), allow_download=False))
    bare = whisper.load_model(checkpoint)
    live = whisper.load_model(checkpoint)
    emulated = args.encoder == "bf16" and not onednn_bf16()  # bf16 would be emulated slowly, and fail to pack
    encoder = "none" if emulated else args.encoder
    applied = apply_arithmetic(live, StageArithmetic(encoder, args.decoder, encoder))
    if emulated:
        swap_linears(applied.live_encoder, EmulatedBf16Linear)
    detector = SpeechDetector(30)
    detector.load()
    thread = ModelThread(8, wait_s=0.05)
    thread.start(live, applied.projection)
    use_torch_threads(1)  # the session's own thread, as the service runs it
    try:
        session = partial(live_text, live, applied.live_encoder, thread, detector)
        for name in args.sets.split(","):
            paths = recordings(name, args.speech)
            if name == "nonen":
                print(languages_kept(bare, session, paths), flush=True)  # noqa: T201
                continue
            references = [path.with_suffix(".txt").read_text() for path in paths]
            audios = [whisper.load_audio(str(path)) for path in paths]
            started = time.perf_counter()
            live_texts = [session(audio)[0] for audio in audios]
            live_s = time.perf_counter() - started
            use_torch_threads(MODEL_THREADS)
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
