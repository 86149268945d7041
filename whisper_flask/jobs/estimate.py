"""A running job's ETA and percentage, learned from how fast each of its loops gets through its frames.

A job runs one transcribe loop, or several side by side (engine/parts.py); the job ends when its
slowest loop does. So each loop's speed is measured on its own (frames done over the time since
it was first seen, window starts being the only moments its position is known), steadied by all
loops' pooled speed while it has ended few windows, and the job's time left is the longest of its
loops' (ARCHITECTURE.md, "The engine"). Frames a loop skips (long
stretches without speech) cost nothing: where the engine says how many frames of clips a loop has
left (`Window.left`), those are what is counted. The percentage is then time: elapsed over elapsed
plus the time left, never going back. Pure: the caller gives the clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from whisper.audio import N_FRAMES

from whisper_flask.engine.windows import Window

#: 100 is kept for "completed": a job still running shows 99.9 at most.
MAX_SHOWN = 99.9
#: A timed loop's own rate weighs as many windows as it has ended against this many at the rate of all
#: loops. One window's rate varies with its tokens (by 15 to 20 % on the Kathleen recording) more than
#: the parts of one recording differ, and the slowest of several noisy rates is too slow: replaying five
#: undisturbed runs of bench/eta.py on it, 3 kept the ETA within 25 % in 122 of 149 samples, none in 75.
POOLED_WINDOWS = 3.0


@dataclass
class _Loop:
    """What is known of one loop: where it was first seen, and where it stands now."""

    first_at: float
    first_left: int
    at: float
    left: int
    done: bool
    windows: int = 0  # ended since it was first seen

    def rate(self) -> float | None:
        """Frames per second since it was first seen; None until it has finished a window."""
        if self.at <= self.first_at or self.left >= self.first_left:
            return None
        return (self.first_left - self.left) / (self.at - self.first_at)


class Estimate:
    """A job's ETA and monotone percentage, from the windows it reports (`observe`) and the time."""

    def __init__(self, frames: int, started: float) -> None:
        self._frames = frames  # the whole recording's, for the share shown before any speed is known
        self._started = started
        self._loops: dict[int, _Loop] = {}
        self._queued: dict[int, int] = {}  # parts not started yet (a chunked job's beyond its places): their frames
        self._processed = 0  # frames the loops' positions add up to
        self._shown = 0.0

    def observe(self, window: Window, now: float) -> None:
        """A loop of the job starts a window (a job in parts: one of them, all parts' states given)."""
        if not window.parts:
            self._see(0, window.left if window.left is not None else self._frames - window.seek, False, now)
        for index, state in enumerate(window.parts):
            seek, left, done = int(state["window"]["seek"]), state["window"].get("left"), bool(state["done"])
            span = int(state["end"]) - int(state["start"])
            if left is None and seek == 0 and not done:
                self._queued[index] = span  # a part whose loop has not reported yet: it waits for a place
                continue
            self._queued.pop(index, None)
            self._see(index, 0 if done else span - seek if left is None else int(left), done, now)
        self._processed = max(self._processed, window.seek)

    def _see(self, index: int, left: int, done: bool, now: float) -> None:
        loop = self._loops.get(index)
        if loop is None:
            self._loops[index] = _Loop(now, left, now, left, done)
        elif loop.left != left or loop.done != done:  # a state seen again (another part's window) is no news
            loop.at, loop.left, loop.done, loop.windows = now, left, done, loop.windows + 1

    def eta(self, now: float) -> float | None:
        """Seconds until the slowest unfinished loop ends; None until some loop has finished a window."""
        running = [loop for loop in self._loops.values() if not loop.done]
        if not running:
            return 0.0 if self._loops else None
        timed = [loop for loop in self._loops.values() if loop.rate() is not None]
        if not timed:
            return None
        # Loops share the model thread's steps, so all of them tell of each one's rate: one not yet timed goes
        # at the rate of all timed (no faster than its running window allows), a timed one's own rate weighs
        # its windows against POOLED_WINDOWS of theirs (one window's rate is as noisy as its tokens are many).
        pooled = sum(loop.first_left - loop.left for loop in timed) / sum(loop.at - loop.first_at for loop in timed)
        slowest = max(_time_left(loop, _rate(loop, pooled, now), now) for loop in running)
        if not self._queued:
            return slowest
        # Queued parts start as running ones end: all that is left goes at the running loops' pace together.
        left = sum(loop.left for loop in running) + sum(self._queued.values())
        return max(slowest, left / (pooled * len(running)) - (now - max(loop.at for loop in running)))

    def progress(self, now: float) -> float:
        """The percentage: the share of the time gone, once there is an ETA (before it, of the audio); never less."""
        eta = self.eta(now)
        elapsed = now - self._started
        if eta is not None and elapsed + eta > 0:
            share = elapsed / (elapsed + eta)
        else:
            share = self._processed / self._frames if self._frames > 0 else 0.0
        self._shown = max(self._shown, min(MAX_SHOWN, round(100 * share, 1)))
        return self._shown


def _rate(loop: _Loop, pooled: float, now: float) -> float:
    """The loop's rate: its own weighed against the pooled one, or the pooled one bounded if it has none yet."""
    own = loop.rate()
    if own is None:
        return _bounded(pooled, loop, now)
    return (loop.windows * own + POOLED_WINDOWS * pooled) / (loop.windows + POOLED_WINDOWS)


def _bounded(rate: float, loop: _Loop, now: float) -> float:
    """`rate`, or less if the loop's window (up to N_FRAMES) has taken so long that it cannot be going that fast."""
    if now <= loop.at:
        return rate
    return min(rate, min(N_FRAMES, loop.left) / (now - loop.at))


def _time_left(loop: _Loop, rate: float, now: float) -> float:
    """The loop's time left at its speed, counted down since its window started.

    Never under the time of the frames past its current window (a window holds at most N_FRAMES):
    those have not started, however late this window runs.
    """
    return max(loop.left / rate - (now - loop.at), max(0, loop.left - N_FRAMES) / rate)
