"""Long real recordings and eight short ones at once: the service against bare openai-whisper, faster-whisper
and whisper.cpp, in one run.

    .venv/bin/pip install -r bench/requirements.txt   # faster-whisper and pywhispercpp, for benchmarks only
    .venv/bin/python bench/long_file.py [--model base] [--speech ../shared/speech] [--quantize auto]
                                        [--threads 2] [--quick] [--engines ...] [--work DIR]

Workloads, real speech with reference texts (the speech directory's README.md says where it comes from):

1. long-ljspeech, long-kathleen: each of en/long/*_concat.wav on its own (about 4 minutes each: one
   speaker's consecutive utterances), one file, one job;
2. long-pauses: the Kathleen recording with 60 s of faint noise (-60 dBFS) inserted twice, in the pauses after
   the utterances ending by 90 s and by 180 s (396 s in all; the reference is the whole text), one job;
3. utts: 8 different utterances of 5 to 10 s from en/utt/ (the .wav files with a .txt beside them, taken
   in turn from each speaker directory in name order: kathleen, librispeech, ljspeech; 58 s in all), each
   file on its own (not joined), all at once. Five of them (LJ001-0001, 0003 to 0006) are also in the long
   LJSpeech file: en/utt/ has too few other .wav files of that length.

Every input is first converted once with ffmpeg to 16 kHz mono 16-bit WAV, so that each engine reads the
same samples (the times include each engine's own reading of that file). --quick cuts each long file in the
pause after its last utterance that ends by 45 s (the reference is those utterances' text) and takes 2
utterances, for trying the benchmark out; its figures are not the benchmark's.

Engines, each on the same weights (the model's registry pack: converted to openai-whisper's .pt as the
service does, as shipped for faster-whisper, and converted by bench/ggml.py for whisper.cpp, float16 like
the pack), English, greedy decoding, whisper.transcribe()'s temperature fallback and thresholds:

- bare `whisper.transcribe`, fp32, the files one after another;
- faster-whisper int8 `WhisperModel.transcribe`, the files one after another (bench/peers.py);
- faster-whisper int8 `BatchedInferencePipeline`, batch_size 8, the files one after another (it batches the
  windows of one file: Silero VAD cuts the file into chunks of up to 30 s; by its design it has no temperature
  fallback and does not condition a chunk on the previous text);
- whisper.cpp through pywhispercpp, float16, --threads threads (its entropy threshold 2.4 stands in for the
  gzip compression-ratio threshold; "no_context" only means not to carry text over from the previous file);
- the service in this process: all files of a workload submitted at once (MAX_WORKERS = files, or its default
  for a single file), QUANTIZE=--quantize; timed from the first submit to the last job's finished_at, the text
  read from TRANSCRIPT_DIR/<job_id>.json; then again with SKIP_NON_SPEECH_S=0 (every stretch transcribed), and with
  chunking_strategy=auto (speech cut at pauses into chunks of up to 30 s, decoded side by side without context).

faster-whisper and whisper.cpp use --threads CPU threads; bare whisper and the service use torch's default.
Each (engine, workload) runs in a fresh process (bench/isolation.py) after loading its model; the time
excludes model loading. It reports audio-seconds per wall-second, the ratios to bare whisper and to the
batched faster-whisper row, and the word error rate over the workload's words (Whisper's English normaliser);
under each table, where the service's model thread spent its time in each service run (bench/model_time.py).
The CPU should be otherwise idle: the load average at the start is printed beside the results.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from whisper.normalizers import EnglishTextNormalizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ggml import convert_to_ggml  # noqa: E402
from bench.isolation import measure_apart, report  # noqa: E402
from bench.model_time import describe, model_time  # noqa: E402
from bench.overhead import transcribe_bare  # noqa: E402
from bench.peers import ct2_model_dir, transcribe_faster_whisper, word_error_rate  # noqa: E402
from whisper_flask import create_app  # noqa: E402
from whisper_flask.access.control import UNRESTRICTED  # noqa: E402
from whisper_flask.audio.subprocesses import media_tool  # noqa: E402
from whisper_flask.engine.checkpoints import ensure_checkpoint  # noqa: E402
from whisper_flask.engine.options import Chunking, TranscribeOptions  # noqa: E402
from whisper_flask.extension import get_service  # noqa: E402
from whisper_flask.jobs.records import Job, Submission  # noqa: E402
from whisper_flask.jobs.writers import transcript_path  # noqa: E402

ENGINES = ("bare", "fw-int8", "fw-batched-int8", "whisper.cpp", "service", "service-no-skip", "service-chunked")
LONG_FILES = ("ljspeech_LJ001-0001_0032_concat", "kathleen_arctic_a0061_a0140_concat")
UTTERANCES = 8
UTTERANCE_SECONDS = (5.0, 10.0)
QUICK_SECONDS = 45.0
QUICK_UTTERANCES = 2
#: The long-pauses workload: the second long file with this much faint noise after the utterances
#: ending by these times (a recording with long quiet stretches, as a meeting or a lecture has).
PAUSES = ((90.0, 180.0), 60.0)
BATCH_SIZE = 8
# whisper.transcribe()'s defaults, which every engine is given in its own terms.
TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
COMPRESSION_RATIO_THRESHOLD = 2.4
LOGPROB_THRESHOLD = -1.0
NO_SPEECH_THRESHOLD = 0.6


@dataclass(frozen=True)
class Workload:
    """Files transcribed in one measurement, with their reference texts."""

    name: str
    paths: list[str]
    references: list[str]
    audio_seconds: float
    source: str


def wav_seconds(path: Path) -> float:
    """Length of a WAV file in seconds, from its header."""
    with wave.open(str(path)) as audio:
        return audio.getnframes() / audio.getframerate()


def to_wav16k(source: Path, target: Path, seconds: float | None = None) -> Path:
    """Convert (and optionally cut) a recording to 16 kHz mono 16-bit WAV with ffmpeg."""
    cut = ["-t", f"{seconds:.3f}"] if seconds is not None else []
    subprocess.run(
        [media_tool("ffmpeg"), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(source), *cut]
        + ["-ar", "16000", "-ac", "1", "-sample_fmt", "s16", str(target)],
        check=True,
    )
    return target


def quick_cut(segments_tsv: Path, seconds: float) -> tuple[float, str]:
    """Where to cut a long file (midway into the pause after its last utterance ending by `seconds`) and that text."""
    with segments_tsv.open(newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file, delimiter="\t"))
    kept = [row for row in rows if float(row["end"]) <= seconds] or rows[:1]
    end = float(kept[-1]["end"])
    if len(kept) < len(rows):
        end = (end + float(rows[len(kept)]["start"])) / 2
    return end, " ".join(row["text"] for row in kept)


def with_pauses(source: Path, segments_tsv: Path, target: Path, at: Sequence[float], pause_s: float) -> Path:
    """The recording with `pause_s` of faint noise (-60 dBFS, a quiet room) in the pause after the last
    utterance ending by each of `at` seconds; nothing of the speech is removed."""
    with wave.open(str(to_wav16k(source, target))) as audio:
        samples = np.frombuffer(audio.readframes(audio.getnframes()), np.int16)
    cuts = [round(quick_cut(segments_tsv, seconds)[0] * 16000) for seconds in at]
    noise = np.random.default_rng(0).normal(0, 32768 * 10 ** (-60 / 20), round(pause_s * 16000)).astype(np.int16)
    pieces = [samples[start:end] for start, end in zip([0, *cuts], [*cuts, len(samples)], strict=True)]
    with wave.open(str(target), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(np.concatenate([piece for cut in pieces for piece in (cut, noise)][:-1]).tobytes())
    return target


def long_workloads(speech: Path, audio_dir: Path, quick: bool) -> list[Workload]:
    """One workload for each long recording, converted (with --quick: cut) into audio_dir."""
    workloads = []
    for stem in LONG_FILES:
        source = speech / "en" / "long" / f"{stem}.wav"
        cut, reference = None, source.with_suffix(".txt").read_text(encoding="utf-8").strip()
        if quick:
            cut, reference = quick_cut(source.with_name(f"{stem}.segments.tsv"), QUICK_SECONDS)
        path = to_wav16k(source, audio_dir / f"{stem}.wav", cut)
        name = "long-" + stem.split("_")[0]
        workloads.append(Workload(name, [str(path)], [reference], wav_seconds(path), source.name))
    if not quick:
        stem = LONG_FILES[1]
        source = speech / "en" / "long" / f"{stem}.wav"
        path = with_pauses(source, source.with_name(f"{stem}.segments.tsv"), audio_dir / "pauses.wav", *PAUSES)
        reference = source.with_suffix(".txt").read_text(encoding="utf-8").strip()
        workloads.append(Workload("long-pauses", [str(path)], [reference], wav_seconds(path), f"{source.name}, paused"))
    return workloads


def pick_utterances(speech: Path, count: int) -> list[Path]:
    """count utterances of 5 to 10 s with a reference, taken in turn from each speaker directory in name order."""
    pools = []
    for directory in sorted(path for path in (speech / "en" / "utt").iterdir() if path.is_dir()):
        lo, hi = UTTERANCE_SECONDS
        pools.append(
            [
                path
                for path in sorted(directory.glob("*.wav"))
                if path.with_suffix(".txt").is_file() and lo <= wav_seconds(path) <= hi
            ]
        )
    picked: list[Path] = []
    while len(picked) < count and any(pools):
        for pool in pools:
            if pool and len(picked) < count:
                picked.append(pool.pop(0))
    if len(picked) < count:
        raise SystemExit(f"only {len(picked)} utterances of {UTTERANCE_SECONDS} s in {speech / 'en' / 'utt'}")
    return picked


def utterance_workload(speech: Path, audio_dir: Path, count: int) -> Workload:
    """count short utterances converted into audio_dir, to be transcribed all at once."""
    sources = pick_utterances(speech, count)
    paths = [to_wav16k(source, audio_dir / f"utt-{i}-{source.stem}.wav") for i, source in enumerate(sources)]
    references = [source.with_suffix(".txt").read_text(encoding="utf-8").strip() for source in sources]
    names = ", ".join(f"{source.parent.name}/{source.stem}" for source in sources)
    return Workload("utts", [str(p) for p in paths], references, sum(map(wav_seconds, paths)), names)


def transcribe_faster_whisper_batched(
    model_dir: Path, paths: Sequence[Path], threads: int, batch_size: int
) -> tuple[list[str], float]:
    """Transcribe each file in turn with faster-whisper's BatchedInferencePipeline (int8, greedy); texts, seconds."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # a local model directory: never try the hub
    from faster_whisper import BatchedInferencePipeline, WhisperModel
    from faster_whisper.vad import get_vad_model

    pipeline = BatchedInferencePipeline(WhisperModel(str(model_dir), "cpu", compute_type="int8", cpu_threads=threads))
    get_vad_model()  # the Silero VAD model, loaded (and cached) before the clock starts, like the Whisper model
    texts = []
    started = time.perf_counter()
    for path in paths:
        segments, _ = pipeline.transcribe(
            str(path),
            language="en",
            batch_size=batch_size,
            beam_size=1,
            best_of=1,
            temperature=TEMPERATURES,  # the pipeline uses the first only: no fallback
            compression_ratio_threshold=COMPRESSION_RATIO_THRESHOLD,
            log_prob_threshold=LOGPROB_THRESHOLD,
            no_speech_threshold=NO_SPEECH_THRESHOLD,
            suppress_blank=True,
            suppress_tokens=[-1],
        )
        texts.append("".join(segment.text for segment in segments))
    return texts, time.perf_counter() - started


def transcribe_whisper_cpp(model_path: Path, paths: Sequence[Path], threads: int) -> tuple[list[str], float]:
    """Transcribe each file in turn with whisper.cpp (pywhispercpp), as whisper.transcribe() would; texts, seconds."""
    from pywhispercpp.model import Model

    if not model_path.is_file():  # pywhispercpp would take a missing path for a model name and download it
        raise FileNotFoundError(model_path)
    model = Model(
        str(model_path),
        redirect_whispercpp_logs_to=None,  # the loader's log, to /dev/null
        n_threads=threads,
        print_progress=False,
        language="en",
        greedy={"best_of": 1},  # greedy at temperature 0, one sample for each fallback temperature
        temperature=TEMPERATURES[0],
        temperature_inc=TEMPERATURES[1] - TEMPERATURES[0],
        entropy_thold=COMPRESSION_RATIO_THRESHOLD,
        logprob_thold=LOGPROB_THRESHOLD,
        no_speech_thold=NO_SPEECH_THRESHOLD,
        suppress_blank=True,
        suppress_nst=True,  # whisper's suppress_tokens="-1": the non-speech symbols
        max_initial_ts=1.0,
        # Each window is still conditioned on the previous window's text; False would carry the previous
        # file's text into the next file's first window (whisper.cpp keeps it in its state between calls).
        no_context=True,
    )
    texts = []
    started = time.perf_counter()
    for path in paths:
        texts.append(" ".join(segment.text for segment in model.transcribe(str(path))))
    return texts, time.perf_counter() - started


def serve_all_at_once(
    work: Path,
    model: str,
    paths: Sequence[Path],
    quantize: str,
    run_id: str,
    skip_non_speech_s: float | None,
    chunking: Chunking | None = None,
) -> tuple[list[str], float, list[str]]:
    """Submit every file at once to the service in this process; texts, first submit to last job's end in s, and
    where the model thread's time went meanwhile (bench/model_time.py)."""
    config: dict[str, Any] = {
        "MODEL": model,
        "MODEL_DIR": work / "models",
        "MODEL_DOWNLOAD": False,
        "AUTH": "off",
        "UPLOAD_DIR": work / run_id / "uploads",
        "TRANSCRIPT_DIR": work / run_id / "transcripts",
        "LOG_DIR": work / run_id / "logs",
        "QUANTIZE": quantize,
    }
    if skip_non_speech_s is not None:
        config["SKIP_NON_SPEECH_S"] = skip_non_speech_s
    if len(paths) > 1:
        config["MAX_WORKERS"] = len(paths)  # one job: the default, so the engine may use its free batch places
    service = get_service(create_app(config))
    service.start()
    try:
        service.parts.engine.wait_until_ready(300)  # type: ignore[attr-defined]
        names = []
        for i, path in enumerate(paths):
            names.append(f"bench-{i}.upload")
            os.link(path, service.settings.UPLOAD_DIR / names[-1])  # as a finished upload: the file itself, no copy
        options = TranscribeOptions(language="en", chunking_strategy=chunking)
        started = datetime.now(timezone.utc)
        with model_time() as tally:
            ids = [
                service.submit(name, Submission(path.name, options, UNRESTRICTED.name)).job.id
                for name, path in zip(names, paths, strict=True)
            ]
            jobs: dict[str, Job] = {}
            while len(jobs) < len(ids):
                time.sleep(0.2)  # in-process reads of the registry: no HTTP, next to no CPU
                for job_id in ids:
                    job = service.parts.registry.view(job_id).job
                    if job.status.value in ("completed", "failed", "cancelled"):
                        if job.status.value != "completed":
                            raise RuntimeError(f"job {job_id} {job.status.value}: {job.error}")
                        jobs[job_id] = job
            profile = describe(tally)
        ended = max(datetime.fromisoformat(str(job.finished_at)) for job in jobs.values())
        texts = [
            json.loads(transcript_path(service.settings.TRANSCRIPT_DIR, job_id, "json").read_text(encoding="utf-8"))[
                "text"
            ]
            for job_id in ids
        ]
    finally:
        service.stop()
    return texts, (ended - started).total_seconds(), profile


def measure(engine: str, workload: Workload, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One engine on one workload, in this process: texts and wall seconds."""
    paths = [Path(path) for path in workload.paths]
    if engine == "bare":
        seconds, texts = transcribe_bare(work, args.model, paths, language="en")
    elif engine == "fw-int8":
        texts, seconds = transcribe_faster_whisper(ct2_model_dir(args.model, work), paths, "int8", args.threads)
    elif engine == "fw-batched-int8":
        texts, seconds = transcribe_faster_whisper_batched(
            ct2_model_dir(args.model, work), paths, args.threads, BATCH_SIZE
        )
    elif engine == "whisper.cpp":
        texts, seconds = transcribe_whisper_cpp(ggml_path(work, args.model), paths, args.threads)
    elif engine in ("service", "service-no-skip", "service-chunked"):
        run_id = f"{engine}-{workload.name}-{time.time_ns()}"
        skip = 0 if engine == "service-no-skip" else None
        chunking = Chunking() if engine == "service-chunked" else None
        texts, seconds, profile = serve_all_at_once(work, args.model, paths, args.quantize, run_id, skip, chunking)
        return {"seconds": seconds, "texts": texts, "model_thread": profile}
    else:
        raise ValueError(f"unknown engine {engine!r}")
    return {"seconds": seconds, "texts": texts}


def ggml_path(work: Path, model: str) -> Path:
    """Where the whisper.cpp model converted from the model's checkpoint lives."""
    return work / "models" / f"ggml-{model}.bin"


def corpus_wer(references: Sequence[str], texts: Sequence[str]) -> float:
    """Word error rate over all the files' words: each file's errors, weighted by its reference's length."""
    normalize = EnglishTextNormalizer()
    words = [len(normalize(reference).split()) for reference in references]
    errors = sum(n * word_error_rate(ref, text) for n, ref, text in zip(words, references, texts, strict=True))
    return errors / max(1, sum(words))


def engine_name(engine: str, args: argparse.Namespace) -> str:
    """A row's label."""
    return {
        "bare": "openai-whisper fp32, sequential",
        "fw-int8": "faster-whisper int8, sequential",
        "fw-batched-int8": f"faster-whisper batched int8, bs {BATCH_SIZE}",
        "whisper.cpp": f"whisper.cpp f16, {args.threads} threads",
        "service": f"service, at once, QUANTIZE={args.quantize}",
        "service-no-skip": "the same, SKIP_NON_SPEECH_S=0",
        "service-chunked": "the same, chunking_strategy=auto",
    }[engine]


def table(workload: Workload, results: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """The lines of one workload's table."""
    files = len(workload.paths)
    out = [
        f"{workload.name}: {files} file(s), {workload.audio_seconds:.1f} s of speech ({workload.source})",
        f"  {'':40} {'wall s':>7} {'audio-s/s':>9} {'x bare':>7} {'x fw-batch':>10} {'WER %':>6}",
    ]
    speed = {engine: workload.audio_seconds / result["seconds"] for engine, result in results.items()}
    for engine, result in results.items():
        x_bare = f"{speed[engine] / speed['bare']:7.2f}" if "bare" in speed else f"{'-':>7}"
        x_batch = f"{speed[engine] / speed['fw-batched-int8']:10.2f}" if "fw-batched-int8" in speed else f"{'-':>10}"
        wer = corpus_wer(workload.references, result["texts"])
        out.append(
            f"  {engine_name(engine, args):40} {result['seconds']:7.2f} {speed[engine]:9.2f} {x_bare} {x_batch}"
            f" {100 * wer:6.2f}"
        )
    for engine, result in results.items():
        if "model_thread" in result:
            out.append(f"  the model thread in '{engine_name(engine, args)}':")
            out += [f"    {line}" for line in result["model_thread"]]
    return out


def main() -> None:
    """Prepare the inputs and the converted models, then measure each engine on each workload in a fresh process."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--speech", type=Path, default=ROOT.parent / "shared" / "speech", help="real speech")
    parser.add_argument("--quantize", default="auto", help="the service's QUANTIZE setting, passed through")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of faster-whisper and whisper.cpp")
    parser.add_argument("--quick", action="store_true", help=f"long files cut to {QUICK_SECONDS:.0f} s, 2 utterances")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--work", type=Path, help="a directory for inputs and converted models (default: a new one)")
    parser.add_argument("--measure", nargs=3, metavar=("ENGINE", "WORKLOAD", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        engine, name, work = args.measure[0], args.measure[1], Path(args.measure[2])
        saved = json.loads((work / "workloads.json").read_text(encoding="utf-8"))
        report(measure(engine, Workload(**saved[name]), work, args))
        return

    began = time.monotonic()
    load = os.getloadavg()[0]
    work = args.work or Path(tempfile.mkdtemp(prefix="whisper-long-file-"))
    audio_dir = work / ("audio-quick" if args.quick else "audio")
    audio_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = ensure_checkpoint(args.model, work / "models", allow_download=False)
    if "whisper.cpp" in args.engines:
        convert_to_ggml(checkpoint, ggml_path(work, args.model))
    workloads = long_workloads(args.speech, audio_dir, args.quick)
    workloads.append(utterance_workload(args.speech, audio_dir, QUICK_UTTERANCES if args.quick else UTTERANCES))
    (work / "workloads.json").write_text(json.dumps({w.name: asdict(w) for w in workloads}), encoding="utf-8")

    options = ["--model", args.model, "--quantize", args.quantize, "--threads", str(args.threads)]
    results: dict[str, dict[str, dict[str, Any]]] = {workload.name: {} for workload in workloads}
    for workload in workloads:
        for engine in args.engines:
            results[workload.name][engine] = measure_apart(Path(__file__), options, engine, workload.name, str(work))

    out = [
        f"model {args.model}{', QUICK (not the benchmark)' if args.quick else ''}; {os.cpu_count()} CPUs,"
        f" load average {load:.2f} at the start; {time.monotonic() - began:.0f} s in all; work {work}"
    ]
    for workload in workloads:
        out += table(workload, results[workload.name], args)
    print("\n".join(out))  # noqa: T201


if __name__ == "__main__":
    main()
