"""A long job cut into parts at quiet moments, each part run through Whisper's own loop beside the others.

One transcribe loop decodes its windows one after another, so a lone long job gives the model
thread one window per decoder step. Cut into parts, its loops run at once and their windows share
the steps, as concurrent jobs do (ARCHITECTURE.md, "The engine"). A part is a span of the job's
spectrogram; its loop keeps Whisper's prompts, temperature fallback and timestamps within it.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from whisper.audio import FRAMES_PER_SECOND, N_FRAMES

from whisper_flask.engine.speech import Clip
from whisper_flask.engine.windows import Window, WindowHook
from whisper_flask.exceptions import JobStopped

#: No part is shorter than two windows. Each part's last window still costs a whole 30 s encoder
#: pass: on a 232 s recording (base, int8, 2 cores) 3 parts took 12.3 s and 7 parts 16.9 s,
#: against 15.8 s in one loop.
MIN_PART_FRAMES = 2 * N_FRAMES
#: A cut goes to the quietest moment within this distance of its even spacing.
SEARCH_FRAMES = 5 * FRAMES_PER_SECOND
#: Quietness is measured over this span (0.3 s), so that a cut falls in a pause, not between syllables.
QUIET_FRAMES = 31


@dataclass(frozen=True)
class Part:
    """A span of the job's spectrogram, in frames; its loop's seek and segments are relative to `start`."""

    start: int
    end: int


class PartsAborted(JobStopped):
    """Another part of the job failed or was stopped; this one stops at its next step too (never leaves run_parts)."""


def plan_parts(mel: Tensor, content_frames: int, clips: list[Clip], places: int) -> list[Part]:
    """Cut the audio into at most `places` parts holding similar lengths of its clips (the spans to
    transcribe), each cut at the quietest moment near its even share."""
    speech = sum(end - start for start, end in clips)
    count = max(1, min(places, speech // MIN_PART_FRAMES))
    if count == 1:
        return [Part(0, content_frames)]
    loudness = mel[:, :content_frames].mean(dim=0)[None, None]
    quiet = F.avg_pool1d(loudness, QUIET_FRAMES, stride=1, padding=QUIET_FRAMES // 2, count_include_pad=False)[0, 0]
    bounds = [0]
    for index in range(1, count):
        target = _frame_at(clips, speech * index // count)
        low, high = max(target - SEARCH_FRAMES, bounds[-1] + 1), min(target + SEARCH_FRAMES, content_frames - 1)
        bounds.append(low + int(torch.argmin(quiet[low:high])))
    bounds.append(content_frames)
    return [Part(start, end) for start, end in zip(bounds, bounds[1:], strict=False)]


def _frame_at(clips: list[Clip], offset: int) -> int:
    """The frame `offset` frames into the clips, counting only their frames."""
    for start, end in clips:
        if offset < end - start:
            return start + offset
        offset -= end - start
    return clips[-1][1]


def part_clips(clips: list[Clip], part: Part) -> list[Clip]:
    """The clips within the part, relative to its start."""
    return [
        (max(start, part.start) - part.start, min(end, part.end) - part.start)
        for start, end in clips
        if start < part.end and end > part.start
    ]


def run_parts(
    progress: PartedProgress, run_part: Callable[[int], list[dict[str, Any]]], places: int
) -> list[dict[str, Any]]:
    """Run the unfinished parts (their segments: `run_part(index)`) in order, `places` at a time, each on a
    thread; the job's segments.

    All threads are joined before this returns. If parts fail, the first part's own error is raised,
    not the PartsAborted its siblings stopped with.
    """
    errors: dict[int, BaseException] = {}
    # In order, so that the text a stream sees (an in-order prefix) grows as parts end.
    unfinished = [index for index in range(len(progress.parts)) if not progress.done(index)]
    waiting, taking = iter(unfinished), threading.Lock()

    def run() -> None:
        while not errors:
            with taking:
                index = next(waiting, None)
            if index is None:
                return
            try:
                progress.finish(index, run_part(index))
            except BaseException as exc:  # re-raised by the calling thread below
                errors[index] = exc
                progress.fail()

    name, count = threading.current_thread().name, min(places, len(unfinished))
    threads = [threading.Thread(target=run, name=f"{name}-part{place}") for place in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        ordered = [errors[index] for index in sorted(errors)]
        raise next((error for error in ordered if not isinstance(error, PartsAborted)), ordered[0])
    return progress.segments()


def part_mel(mel: Tensor, part: Part) -> Tensor:
    """The part's spectrogram as Whisper's loop takes it: its frames, then N_FRAMES it never reads (a view)."""
    # transcribe() reads up to mel.shape[-1] - N_FRAMES and pads each window itself.
    return mel[:, part.start : part.end + N_FRAMES]


class PartedProgress:
    """The parts' windows as one job's: progress summed, segments in order, each part's state for a resume.

    Part threads report here; the job's hook is called under the lock, so the job sees (and saves)
    one consistent state at a time.
    """

    def __init__(self, parts: list[Part], states: list[dict[str, Any]], language: str | None, on_window: WindowHook):
        self.parts = parts
        self._states = states
        self.language = language
        self._on_window = on_window
        self._lock = threading.Lock()
        self._failed = False

    @classmethod
    def fresh(cls, parts: list[Part], language: str | None, on_window: WindowHook) -> PartedProgress:
        """Progress of parts that have not started."""
        states = [_state(part, Window(0, [], [], language), done=False) for part in parts]
        return cls(parts, states, language, on_window)

    @classmethod
    def resumed(cls, window: Window, on_window: WindowHook) -> PartedProgress:
        """Progress of parts as an interrupted run of the job reported them."""
        parts = [Part(state["start"], state["end"]) for state in window.parts]
        return cls(parts, [dict(state) for state in window.parts], window.language, on_window)

    def window(self, index: int) -> Window | None:
        """Where part `index` stood (None if it has not started); raises nothing."""
        state = self._states[index]
        return Window(**state["window"]) if state["window"]["seek"] or state["window"]["segments"] else None

    def done(self, index: int) -> bool:
        """Whether part `index` had finished."""
        return bool(self._states[index]["done"])

    def hook(self, index: int) -> WindowHook:
        """The window hook of part `index`'s loop."""

        def on_part_window(window: Window) -> None:
            with self._lock:
                if self._failed:
                    raise PartsAborted
                self._states[index] = _state(self.parts[index], window, done=False)
                self._report()

        return on_part_window

    def checked(self, check: Callable[[], None]) -> Callable[[], None]:
        """The job's step check, which also stops a part once another has failed."""

        def check_part() -> None:
            if self._failed:  # read without the lock: it only ever turns True
                raise PartsAborted
            check()

        return check_part

    def finish(self, index: int, segments: list[dict[str, Any]]) -> None:
        """Part `index` has ended with these segments (relative to its start)."""
        with self._lock:
            part = self.parts[index]
            self._states[index] = _state(part, Window(part.end - part.start, segments, [], self.language), done=True)
            self._report()

    def fail(self) -> None:
        """A part failed: the others stop at their next decoder step."""
        with self._lock:
            self._failed = True

    def segments(self) -> list[dict[str, Any]]:
        """Every part's segments on the job's timeline, numbered in order (once all parts are done)."""
        return renumbered([segment for index in range(len(self.parts)) for segment in self._shifted(index)])

    def _report(self) -> None:
        # Caller holds the lock. A client streaming the text may only see a prefix in order:
        # the done parts from the first, then the first unfinished one's segments.
        prefix: list[dict[str, Any]] = []
        for index, state in enumerate(self._states):
            prefix.extend(self._shifted(index))
            if not state["done"]:
                break
        seek = sum(state["window"]["seek"] for state in self._states)
        self._on_window(Window(seek, renumbered(prefix), [], self.language, [dict(s) for s in self._states]))

    def _shifted(self, index: int) -> list[dict[str, Any]]:
        offset = self.parts[index].start
        return [_shift(segment, offset) for segment in self._states[index]["window"]["segments"]]


def _state(part: Part, window: Window, done: bool) -> dict[str, Any]:
    return {"start": part.start, "end": part.end, "done": done, "window": dataclasses.asdict(window)}


def _shift(segment: dict[str, Any], frames: int) -> dict[str, Any]:
    seconds = frames / FRAMES_PER_SECOND
    shifted = {**segment, "seek": segment["seek"] + frames}
    shifted["start"], shifted["end"] = round(segment["start"] + seconds, 3), round(segment["end"] + seconds, 3)
    if "words" in segment:
        shifted["words"] = [
            {**word, "start": round(word["start"] + seconds, 3), "end": round(word["end"] + seconds, 3)}
            for word in segment["words"]
        ]
    return shifted


def renumbered(segments: list[dict[str, Any]], start: int = 0) -> list[dict[str, Any]]:
    """The segments with their ids counted on from `start` (ids are positions in the whole transcript)."""
    return [{**segment, "id": start + index} for index, segment in enumerate(segments)]
