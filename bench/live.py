"""Live transcription on real speech played at real-time pace: how late partial and final text come, and its
word error rate against the same audio transcribed as a file, one session alone and 4 at once beside a file job.

    .venv/bin/python bench/live.py [--model base] [--sessions 4] [--work DIR] [--webm] [--quantize auto]
                                   [--recording AUDIO] [--rounds 1]   (--sessions 0: step 2 only)

Starts gunicorn (deploy/gunicorn.conf.py) on loopback, then:

1. the file: the 70 s LJSpeech chapter (tests/fixtures, public domain; or --recording, its reference text beside
   it as .txt) uploaded with word_timestamps=true;
   its words' end times are the clock ("when was this word spoken") and its text the file-mode baseline;
2. alone: one client streams the chapter over /ws/transcribe as 16 kHz PCM in 100 ms frames, each sent when
   its audio would have been spoken, then {"type": "end"};
3. crowded: --sessions clients at once (each starting 0.25 s after the last), while a file job (the
   4-minute Kathleen recording from ../shared/speech when present, else the chapter again) transcribes; with
   how many cores the service's worker kept busy meanwhile (its threads' CPU time over the wall time; not the
   ffmpeg it runs to decode the file). --rounds runs it that many times, each reported, each file job cancelled
   at its end: one run's p90 varies by a third from the next.

A word's delay is the time from its end in the audio (the file's word timestamps) to the arrival of the
first partial (or final) text that holds it, and of the final text that holds it; live words are matched to
the file's words by difflib on normalised words. Word error rates use Whisper's English normaliser.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peers import _normalizer, word_error_rate  # noqa: E402
from tests.servers import FIXTURES, curl, free_port, start_gunicorn, stop  # noqa: E402
from whisper_flask.access.keys import KeyStore  # noqa: E402
from whisper_flask.engine.checkpoints import ensure_checkpoint  # noqa: E402
from whisper_flask.jobs.database import open_engine  # noqa: E402

FRAME_S = 0.1


def pcm(path: Path) -> bytes:
    """The recording as 16 kHz 16-bit mono PCM."""
    command = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "s16le", "-ac", "1", "-ar", "16000", "-"]
    return subprocess.run(command, capture_output=True, check=True).stdout


def webm(audio: bytes) -> bytes:
    """16 kHz PCM16 as a browser's MediaRecorder sends it: WebM with Opus at 48 kHz."""
    command = ["ffmpeg", "-v", "error", "-f", "s16le", "-ar", "16000", "-ac", "1", "-i", "-", "-ar", "48000"]
    return subprocess.run([*command, "-c:a", "libopus", "-f", "webm", "-"], input=audio, capture_output=True).stdout


def norm(word: str) -> str:
    return str(_normalizer()(word)).strip()


def file_words(base: str, key: str, recording: Path) -> tuple[list[tuple[str, float]], str]:
    """The recording transcribed as a file: its (normalised word, end time) list and its text."""
    status, body = curl("-H", f"Authorization: Bearer {key}", "-F", f"file=@{recording}",
                        "-F", "word_timestamps=true", "-F", "language=en", f"{base}/upload")  # fmt: skip
    assert status == 202, body
    job = json.loads(body)["transcription_id"]
    while json.loads(curl("-H", f"Authorization: Bearer {key}", f"{base}/progress/{job}")[1])["status"] != "completed":
        time.sleep(0.5)
    result = json.loads(curl("-H", f"Authorization: Bearer {key}", f"{base}/download/{job}.json")[1])
    words = [
        (norm(w["word"]), float(w["end"])) for s in result["segments"] for w in s.get("words", []) if norm(w["word"])
    ]
    return words, result["text"]


class Session:
    """One client streaming the recording at real-time pace and timing what comes back."""

    def __init__(self, url: str, key: str, audio: bytes, webm: bytes = b"") -> None:
        self._url, self._key, self._audio, self._webm = url, key, audio, webm
        self.events: list[tuple[float, dict[str, object]]] = []  # (seconds since the first frame, message)
        self.started = 0.0

    def run(self) -> None:
        with connect(self._url, additional_headers={"Authorization": f"Bearer {self._key}"}, max_size=None) as ws:
            reader = threading.Thread(target=self._read, args=(ws,))
            self.started = time.monotonic()
            reader.start()
            step = int(16000 * FRAME_S) * 2
            pieces = -(-len(self._audio) // step)
            stream, size = (self._webm, -(-len(self._webm) // pieces)) if self._webm else (self._audio, step)
            for index in range(pieces):  # a piece of PCM or of the WebM stream, when its audio has been spoken
                time.sleep(max(0.0, self.started + index * FRAME_S - time.monotonic()))
                ws.send(stream[index * size : (index + 1) * size])
            ws.send(json.dumps({"type": "end"}))
            reader.join(120)

    def _read(self, ws: object) -> None:
        for message in ws:  # type: ignore[attr-defined]
            self.events.append((time.monotonic() - self.started, json.loads(message)))

    def final_text(self) -> str:
        return "".join(str(m["text"]) for _, m in self.events if m["type"] == "final")

    def delays(self, clock: list[tuple[str, float]]) -> tuple[list[float], list[float]]:
        """Each file word's delay to its first partial-or-final sight and to its final text."""
        spoken = [word for word, _ in clock]
        first_seen: dict[int, float] = {}
        finalised: dict[int, float] = {}
        finals: list[str] = []
        for at, message in self.events:
            if message["type"] not in ("partial", "final"):
                continue
            words = [w for w in (norm(x) for x in str(message["text"]).split()) if w]
            if message["type"] == "final":
                finals += words
                shown = finals
            else:
                shown = finals + words
            for block in difflib.SequenceMatcher(None, shown, spoken, autojunk=False).get_matching_blocks():
                for offset in range(block.size):
                    index = block.b + offset
                    first_seen.setdefault(index, at)
                    if message["type"] == "final" and block.a + offset >= len(finals) - len(words):
                        finalised.setdefault(index, at)
        partial = [first_seen[i] - clock[i][1] for i in sorted(first_seen)]
        final = [finalised[i] - clock[i][1] for i in sorted(finalised)]
        return partial, final


def cpu_seconds(server: subprocess.Popen[bytes]) -> float:
    """CPU time the gunicorn worker (the master's child, which runs the model) has used so far."""
    worker = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()[0]
    fields = Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime and stime


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1] if len(values) > 1 else values[0]


def report(
    name: str, sessions: list[Session], clock: list[tuple[str, float]], reference: str, file_wer: float, work: Path
) -> None:
    partial: list[float] = []
    final: list[float] = []
    wers = []
    for index, session in enumerate(sessions):
        (work / f"{name.split()[0]}-{index}.json").write_text(json.dumps(session.events))
        p, f = session.delays(clock)
        partial += p
        final += f
        wers.append(word_error_rate(reference, session.final_text()))
    print(  # noqa: T201
        f"{name}: partial delay p50 {quantile(partial, 0.5):.2f} s, p90 {quantile(partial, 0.9):.2f} s;"
        f" final delay p50 {quantile(final, 0.5):.2f} s, p90 {quantile(final, 0.9):.2f} s"
        f" ({len(final)} of {len(clock) * len(sessions)} words final);"
        f" WER live {100 * statistics.mean(wers):.1f} % vs file {100 * file_wer:.1f} %"
    )


def crowded(server: subprocess.Popen[bytes], base: str, key: str, busy: Path, sessions: list[Session]) -> str:
    """Step 3: the sessions at once beside a file job of `busy`, cancelled at the end; the job's state then."""
    status, body = curl("-H", f"Authorization: Bearer {key}", "-F", f"file=@{busy}", f"{base}/upload")
    assert status == 202, body
    threads = [threading.Thread(target=session.run) for session in sessions]
    began, used = time.monotonic(), cpu_seconds(server)
    for thread in threads:
        thread.start()
        time.sleep(0.25)
    for thread in threads:
        thread.join()
    cores = (cpu_seconds(server) - used) / (time.monotonic() - began)
    print(f"the service's worker used {cores:.2f} of {len(os.sched_getaffinity(0))} cores meanwhile")  # noqa: T201
    job = json.loads(body)["transcription_id"]
    state = json.loads(curl("-H", f"Authorization: Bearer {key}", f"{base}/progress/{job}")[1])
    curl("-X", "DELETE", "-H", f"Authorization: Bearer {key}", f"{base}/jobs/{job}")
    return f"{busy.name}, {state['status']} at the end, {float(state['progress']):.0f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--sessions", type=int, default=4, help="0: one session alone only")
    parser.add_argument("--speech", type=Path, default=ROOT.parent / "shared" / "speech")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--webm", action="store_true", help="step 2 also as a MediaRecorder's WebM/Opus stream")
    parser.add_argument("--quantize", default="auto", help="the service's QUANTIZE setting, passed through")
    parser.add_argument("--recording", type=Path, default=FIXTURES / "lj001-chapter-70s.opus",
                        help="the speech to stream, its reference text beside it as .txt")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="how many times to run step 3")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-live-"))
    model_dir = work / "models"
    ensure_checkpoint(args.model, model_dir, allow_download=False)
    (work / "transcripts").mkdir(parents=True, exist_ok=True)
    keys = KeyStore(open_engine(work / "transcripts" / "jobs.sqlite3"))
    key = keys.create("bench", admin=True)
    keys.close()
    port = free_port()
    server = start_gunicorn(work, model_dir, port, MODEL=args.model, MAX_LIVE_SESSIONS=str(args.sessions + 1),
                            MAX_JOBS_PER_KEY="100", QUANTIZE=args.quantize)  # fmt: skip
    base, url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/ws/transcribe?language=en"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
        print(f"model {args.model}, CPU {cpu}, {len(os.sched_getaffinity(0))} cores")  # noqa: T201
        print(f"recording {args.recording.name}")  # noqa: T201
        clock, file_text = file_words(base, key, args.recording)
        reference = args.recording.with_suffix(".txt").read_text()
        file_wer = word_error_rate(reference, file_text)
        audio = pcm(args.recording)
        alone = Session(url, key, audio)
        alone.run()
        report("1 session alone", [alone], clock, reference, file_wer, work)
        if args.webm:
            webm_url = url + "&input_audio_format=webm"
            as_webm = Session(webm_url, key, audio, webm(audio))
            as_webm.run()
            report("1 session alone, WebM/Opus", [as_webm], clock, reference, file_wer, work)
        if not args.sessions:
            return
        long_file = args.speech / "en" / "long" / "kathleen_arctic_a0061_a0140_concat.wav"
        busy = long_file if long_file.exists() else args.recording
        for _ in range(args.rounds):
            crowd = [Session(url, key, audio) for _ in range(args.sessions)]
            job = crowded(server, base, key, busy, crowd)
            report(f"{args.sessions} sessions and a file job ({job})", crowd, clock, reference, file_wer, work)
    finally:
        stop(server)


if __name__ == "__main__":
    main()
