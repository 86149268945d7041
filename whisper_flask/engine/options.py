"""What a job asks of the engine: one frozen TranscribeOptions (api/fields.py parses a client's fields into it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Task(str, Enum):
    """What Whisper does with the speech."""

    TRANSCRIBE = "transcribe"
    TRANSLATE = "translate"


#: The options that are not Whisper's: who spoke when (diarization.py, speakers.py).
SPEAKER_OPTIONS = ("diarize", "min_speakers", "max_speakers", "known_speakers")


@dataclass(frozen=True)
class TranscribeOptions:
    """What a job asked for; None means Whisper's default (detect the language, no prompt, ...)."""

    language: str | None = None
    task: Task | None = None
    initial_prompt: str | None = None
    word_timestamps: bool | None = None
    temperature: float | None = None
    beam_size: int | None = None
    diarize: bool | None = None  # label each segment (and word) with its speaker
    min_speakers: int | None = None
    max_speakers: int | None = None
    # Names of speakers whose voice samples came with the job (/v1's known_speaker_names[]), in order.
    known_speakers: tuple[str, ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The options that were set (their stored and served form)."""
        return {
            field.name: value.value if isinstance(value, Enum) else list(value) if isinstance(value, tuple) else value
            for field in dataclasses.fields(self)
            if (value := getattr(self, field.name)) is not None
        }

    def whisper_keywords(self) -> dict[str, Any]:
        """The options that were set, as `whisper.transcribe` keywords: a diarized job needs its words' times."""
        keywords = {name: value for name, value in self.as_dict().items() if name not in SPEAKER_OPTIONS}
        if self.diarize:
            keywords["word_timestamps"] = True
        return keywords

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TranscribeOptions:
        """The options as_dict() gave (read back from the job store)."""
        task, known = data.get("task"), data.get("known_speakers")
        return cls(**{**data, "task": Task(task) if task else None, "known_speakers": tuple(known) if known else None})
