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


@dataclass(frozen=True)
class TranscribeOptions:
    """What a job asked for; None means Whisper's default (detect the language, no prompt, ...)."""

    language: str | None = None
    task: Task | None = None
    initial_prompt: str | None = None
    word_timestamps: bool | None = None
    temperature: float | None = None
    beam_size: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The options that were set, as `whisper.transcribe` keywords (also their stored and served form)."""
        return {
            field.name: value.value if isinstance(value, Enum) else value
            for field in dataclasses.fields(self)
            if (value := getattr(self, field.name)) is not None
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TranscribeOptions:
        """The options as_dict() gave (read back from the job store)."""
        task = data.get("task")
        return cls(**{**data, "task": Task(task) if task else None})
