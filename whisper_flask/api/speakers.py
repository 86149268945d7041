"""OpenAI's speaker fields under /v1: known_speaker_names[] and known_speaker_references[] in, diarized_json out."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from werkzeug.datastructures import MultiDict

from whisper_flask.exceptions import InvalidOption
from whisper_flask.jobs.records import Job

#: OpenAI's limit on known speakers.
MAX_KNOWN_SPEAKERS = 4
MAX_NAME_CHARS = 64
#: A sample's bytes, decoded (30 s of 48 kHz stereo 16-bit WAV is 5.5 MiB).
MAX_SAMPLE_BYTES = 8 << 20
NAMES, REFERENCES = "known_speaker_names[]", "known_speaker_references[]"
#: The two fields as OpenAPI describes them (describe.py), from the limits known_speakers() applies.
SPEAKER_FIELDS: dict[str, Any] = {
    NAMES: {"type": "array", "maxItems": MAX_KNOWN_SPEAKERS, "items": {"type": "string", "maxLength": MAX_NAME_CHARS}},
    REFERENCES: {"type": "array", "maxItems": MAX_KNOWN_SPEAKERS, "description": "voice samples of at most 30 s, "
                 "as base64 data URLs, one per name", "items": {"type": "string", "pattern": "^data:"}},
}  # fmt: skip
_DATA_URL = re.compile(r"data:[\w.+-]+/[\w.+-]+(?:;[\w.+-]+=[\w.+-]+)*;base64,(?P<data>.*)", re.DOTALL)
#: Letters, digits, spaces and . ' - only: a name goes into subtitles' voice tags (<v Name>), TSV and RTTM columns.
_NAME = re.compile(r"\w[\w .'-]*")


def known_speakers(form: MultiDict[str, str], diarize: bool) -> tuple[list[str], list[bytes]]:
    """The known speakers' names and their voice samples' bytes; InvalidOption naming the field if refused."""
    # OpenAI's clients send a list as repeated `name[]` parts; a plain `name` is taken too.
    names = [name.strip() for name in form.getlist(NAMES) + form.getlist(NAMES[:-2])]
    references = form.getlist(REFERENCES) + form.getlist(REFERENCES[:-2])
    if not names and not references:
        return [], []
    if not diarize:
        raise InvalidOption(NAMES, "known speakers need response_format diarized_json or a model ending in -diarize")
    if len(names) > MAX_KNOWN_SPEAKERS:
        raise InvalidOption(NAMES, f"at most {MAX_KNOWN_SPEAKERS} known speakers")
    if len(references) != len(names):
        raise InvalidOption(REFERENCES, f"one sample for each of the {len(names)} names, in the same order")
    for name in names:
        if len(name) > MAX_NAME_CHARS or not _NAME.fullmatch(name):
            raise InvalidOption(NAMES, f"each name is 1 to {MAX_NAME_CHARS} letters, digits, spaces or . ' -")
    if len(set(names)) != len(names):
        raise InvalidOption(NAMES, "each name once")
    return names, [_sample(index, reference) for index, reference in enumerate(references, start=1)]


def _sample(index: int, reference: str) -> bytes:
    match = _DATA_URL.fullmatch(reference.strip())
    if match is None:
        raise InvalidOption(REFERENCES, f"sample {index} must be a base64 data URL (data:audio/wav;base64,...)")
    if len(match["data"]) > MAX_SAMPLE_BYTES * 4 // 3 + 4:
        raise InvalidOption(REFERENCES, f"sample {index} is over {MAX_SAMPLE_BYTES >> 20} MiB")
    try:
        sample = base64.b64decode(match["data"], validate=True)
    except binascii.Error:
        raise InvalidOption(REFERENCES, f"sample {index} is not valid base64") from None
    if not sample:
        raise InvalidOption(REFERENCES, f"sample {index} is empty")
    return sample


def diarized_segments(result: dict[str, Any]) -> list[dict[str, Any]]:
    """A diarized result's segments in OpenAI's shape (transcript.text.segment, which its stream events share)."""
    return [
        {
            "type": "transcript.text.segment",
            "id": f"seg_{segment['id']}",
            "start": segment["start"],
            "end": segment["end"],
            "speaker": segment.get("speaker") or "A",
            "text": segment["text"].strip(),
        }  # fmt: skip
        for segment in result["segments"]
    ]


def diarized(job: Job, result: dict[str, Any], text: str) -> dict[str, Any]:
    """OpenAI's diarized_json: the task, duration, text and speaker-labelled segments, and the usage by duration."""
    duration = job.duration or 0.0
    return {
        "task": "transcribe",
        "duration": duration,
        "text": text,
        "segments": diarized_segments(result),
        "usage": {"type": "duration", "seconds": duration},
    }
