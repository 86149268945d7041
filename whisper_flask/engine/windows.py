"""Where a job's transcription stands as a window starts: what progress, streaming and a resume need."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from whisper.audio import FRAMES_PER_SECOND


@dataclass(frozen=True)
class Window:
    """Whisper's transcribe loop as a window starts (for a job in parts: all its loops, parts.py)."""

    seek: int  # frames (1/100 s) of audio decoded so far
    segments: list[dict[str, Any]]  # the segments finished before this window, in order
    prompt: list[int]  # the tokens this window is conditioned on (a job in parts: none)
    language: str | None
    # A job in parts: each part's span, whether it is done, and its own loop's window.
    parts: list[dict[str, Any]] = field(default_factory=list)
    # Frames of this loop's clips from seek on, still to transcribe (skipped stretches are not); None
    # where not counted (a job in parts: each part's own window counts its own).
    left: int | None = None

    @property
    def seconds(self) -> float:
        """Seconds of audio decoded so far."""
        return self.seek / FRAMES_PER_SECOND


#: Called as each window starts, with the loop's state; it may raise to stop the job there.
WindowHook = Callable[[Window], None]
#: Called before each decoder step; it raises to stop the job there (a cancel or a stop).
StepCheck = Callable[[], None]
