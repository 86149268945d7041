"""Transcripts in every format, written with whisper.utils' writers (speakers' turns by our own), atomically."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from whisper.utils import get_writer

from whisper_flask.engine.options import TranscribeOptions
from whisper_flask.exceptions import StorageFull, WriteFailed
from whisper_flask.files import atomic_write, disk_full

#: Download format -> MIME type (werkzeug appends "; charset=utf-8" to the text/ ones).
FORMATS = {
    "txt": "text/plain",
    "srt": "application/x-subrip",
    "vtt": "text/vtt",
    "json": "application/json",
    "tsv": "text/tab-separated-values",
    "rttm": "text/plain",  # who spoke when (NIST's Rich Transcription Time Marked): diarized jobs only
}


def formats_of(options: TranscribeOptions) -> list[str]:
    """The formats a job's transcript comes in: .rttm only when it was diarized."""
    return [fmt for fmt in FORMATS if fmt != "rttm" or options.diarize]


def transcript_path(directory: Path, job_id: str, fmt: str) -> Path:
    """Where a job's transcript in one format lives (job_id and fmt are validated by callers)."""
    return directory / f"{job_id}.{fmt}"


@contextlib.contextmanager
def transcript_writes() -> Iterator[None]:
    """A refused write in TRANSCRIPT_DIR raises StorageFull if the disk is full (space may return), else WriteFailed."""
    try:
        yield
    except OSError as exc:
        if disk_full(exc):
            raise StorageFull(f"the transcript directory is full: {exc.strerror}") from exc
        raise WriteFailed(exc) from exc


def write_transcripts(result: dict[str, Any], directory: Path, job_id: str) -> None:
    """Write every format, each renamed into place once whole: no reader sees half a file.

    StorageFull or WriteFailed if the directory refuses (transcript_writes). Formats already renamed
    stay: no download serves them before the job completes, and writing again replaces them.
    """
    # Each file is fsynced and renamed as the stack unwinds, after the last format is written; the
    # formats not yet renamed when one fails are removed.
    diarized = "speakers" in result
    with transcript_writes(), contextlib.ExitStack() as stack:
        for fmt in FORMATS:
            if fmt == "rttm" and not diarized:
                continue
            file = stack.enter_context(atomic_write(transcript_path(directory, job_id, fmt)))
            if diarized and fmt in _SPEAKER_WRITERS:
                _SPEAKER_WRITERS[fmt](result, file, job_id)
            else:
                get_writer(fmt, str(directory)).write_result(result, file=file, options={})


def _turns_text(result: dict[str, Any], file: TextIO, job_id: str) -> None:
    """Each speaker's turn as a paragraph: "A: what they said"."""
    turns: list[list[str]] = []
    for segment in result["segments"]:
        if not turns or turns[-1][0] != segment["speaker"]:
            turns.append([segment["speaker"]])
        turns[-1].append(segment["text"].strip())
    file.write("\n\n".join(f"{turn[0]}: {' '.join(turn[1:])}" for turn in turns) + ("\n" if turns else ""))


def _voice_tagged(fmt: str) -> Any:
    """Whisper's subtitle writer with each cue in a voice tag: <v A>text (by segment, not by word)."""

    def write(result: dict[str, Any], file: TextIO, job_id: str) -> None:
        segments = [
            {"start": s["start"], "end": s["end"], "text": f"<v {s['speaker']}>{s['text'].strip()}"}
            for s in result["segments"]
        ]
        get_writer(fmt, ".").write_result({**result, "segments": segments}, file=file, options={})

    return write


def _speaker_tsv(result: dict[str, Any], file: TextIO, job_id: str) -> None:
    """Whisper's TSV (integer milliseconds) with a speaker column."""
    print("start", "end", "speaker", "text", sep="\t", file=file)
    for s in result["segments"]:
        text = s["text"].strip().replace("\t", " ")
        print(round(1000 * s["start"]), round(1000 * s["end"]), s["speaker"], text, sep="\t", file=file)


def _rttm(result: dict[str, Any], file: TextIO, job_id: str) -> None:
    """One SPEAKER line per turn; the file is named by the job's id, and a name's spaces become _ (RTTM's columns)."""
    for turn in result["speaker_turns"]:
        duration, speaker = turn["end"] - turn["start"], turn["speaker"].replace(" ", "_")
        print(f"SPEAKER {job_id} 1 {turn['start']:.3f} {duration:.3f} <NA> <NA> {speaker} <NA> <NA>", file=file)


_SPEAKER_WRITERS = {
    "txt": _turns_text, "srt": _voice_tagged("srt"), "vtt": _voice_tagged("vtt"), "tsv": _speaker_tsv, "rttm": _rttm,
}  # fmt: skip
