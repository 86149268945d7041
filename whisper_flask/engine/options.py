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


#: The options that are not Whisper's: who spoke when (diarization.py, speakers.py), and chunking.
ENGINE_OPTIONS = ("diarize", "min_speakers", "max_speakers", "known_speakers", "chunking_strategy")


@dataclass(frozen=True)
class Chunking:
    """OpenAI's `chunking_strategy` (its server VAD settings): the audio cut at pauses into chunks of up to 30 s,
    decoded side by side, none conditioned on the text before it (ARCHITECTURE.md, "The engine")."""

    threshold: float = 0.5  # the speech probability where speech starts
    prefix_padding_ms: int = 300  # audio kept before (and after) each stretch of speech
    silence_duration_ms: int = 200  # a shorter pause does not end a stretch of speech

    def as_dict(self) -> dict[str, Any]:
        """OpenAI's object for these settings."""
        return {"type": "server_vad", **dataclasses.asdict(self)}


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
    chunking_strategy: Chunking | None = None  # None: Whisper's own loop, each window conditioned on the last

    def as_dict(self) -> dict[str, Any]:
        """The options that were set (their stored and served form)."""
        return {
            field.name: _stored(value)
            for field in dataclasses.fields(self)
            if (value := getattr(self, field.name)) is not None
        }

    def whisper_keywords(self) -> dict[str, Any]:
        """The options that were set, as `whisper.transcribe` keywords: a diarized job needs its words' times, and a
        chunk is decoded without the text before it."""
        keywords = {name: value for name, value in self.as_dict().items() if name not in ENGINE_OPTIONS}
        if self.diarize:
            keywords["word_timestamps"] = True
        if self.chunking_strategy is not None:
            # A chunk is one window decoded once, as faster-whisper's batched pipeline does: with timestamps the
            # model often closes a segment early and Whisper's loop spends a whole encoder pass on the rest.
            keywords.update(condition_on_previous_text=False, without_timestamps=True)
        return keywords

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TranscribeOptions:
        """The options as_dict() gave (read back from the job store)."""
        task, known, chunking = data.get("task"), data.get("known_speakers"), data.get("chunking_strategy")
        return cls(
            **{
                **data,
                "task": Task(task) if task else None,
                "known_speakers": tuple(known) if known else None,
                "chunking_strategy": Chunking(**{k: v for k, v in chunking.items() if k != "type"})
                if chunking
                else None,
            }
        )


def _stored(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value.as_dict() if isinstance(value, Chunking) else value
