"""Progress on a terminal (rich's bars: bytes sent, then the job's progress, stage, time left, queue place)."""

from __future__ import annotations

import threading
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn

from whisper_flask_client.api import JobState


class Bars:
    """One bar per input, on stderr."""

    def __init__(self, console: Console | None = None) -> None:
        # markup=False: a file name and the service's words are shown as they are; as markup, `talk[/b].wav`
        # raised MarkupError and a server's text could restyle the line.
        self.progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[info]}", markup=False),
            console=console or Console(stderr=True),
        )

    def __enter__(self) -> Bars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def tracker(self, name: str) -> BarTracker:
        """A bar for one input."""
        return BarTracker(self.progress, self.progress.add_task(name, total=None, info="waiting"))


class BarTracker:
    """One input's bar: bytes while uploading, then the service's percent."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self.progress = progress
        self.task = task
        self.lock = threading.Lock()
        self.total = 0
        self.done = 0

    def upload(self, total: int) -> None:
        """An upload of `total` bytes starts."""
        self.total, self.done = total, 0
        self.progress.update(self.task, total=total, completed=0, info=f"uploading {_size(total)}")

    def sent(self, count: int) -> None:
        """`count` more bytes were sent."""
        self.done += count
        info = f"uploading {_size(self.done)} of {_size(self.total)}"
        self.progress.update(self.task, completed=self.done, info=info)

    def job(self, state: JobState) -> None:
        """The job's state now."""
        self.progress.update(self.task, total=100, completed=round(state.progress * 100), info=describe(state))

    def note(self, text: str) -> None:
        """A word on what it waits for."""
        self.progress.update(self.task, info=text)


class Quiet:
    """No progress shown: the output is not a terminal."""

    def __enter__(self) -> Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def tracker(self, name: str) -> QuietTracker:
        """A tracker that shows nothing."""
        return QuietTracker()


class QuietTracker:
    """Shows nothing."""

    def upload(self, total: int) -> None:
        """Nothing."""

    def sent(self, count: int) -> None:
        """Nothing."""

    def job(self, state: JobState) -> None:
        """Nothing."""

    def note(self, text: str) -> None:
        """Nothing."""


def describe(state: JobState) -> str:
    """A job's state in a few words: its stage, queue place or time left."""
    if state.status == "pending":
        place = state.queue_position
        return "queued" + (f", place {place}" if isinstance(place, int) else "")
    words: list[Any] = [state.stage or state.status]
    if state.status == "running" and state.eta_seconds is not None:
        words.append(f"{state.eta_seconds:.0f} s left")
    return ", ".join(str(word) for word in words)


def _size(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 100_000 else f"{count / 1e3:.0f} kB"
