"""The ETA and the percentage: the slowest loop decides, skipped stretches cost nothing, the bar tracks time."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
from flask.testing import FlaskClient

from tests.helpers import FakeEngine, upload, wait_for, wav_bytes
from whisper_flask.engine.windows import Window
from whisper_flask.jobs.estimate import POOLED_WINDOWS, Estimate

WINDOW = 3000  # frames a window of Whisper's loop holds (30 s)
STARTED = 0.0  # the fake clock when transcribing began
FIRST_WINDOW_AT = 1.0  # spectrogram and speech detection done


@dataclass(frozen=True)
class Loop:
    """A loop that gets through `rate` frames of its clips a second; `clips` on its own timeline."""

    clips: tuple[tuple[int, int], ...]
    rate: float

    @property
    def frames(self) -> int:
        """Its span (the end of its last clip)."""
        return self.clips[-1][1]

    def windows(self) -> list[tuple[float, int, int]]:
        """(time, seek, frames of clips left) as each window starts, as Whisper's loop goes through the clips."""
        starts, at, left = [], FIRST_WINDOW_AT, sum(end - start for start, end in self.clips)
        for start, end in self.clips:
            seek = start
            while seek < end:  # a window never crosses a clip's end
                starts.append((at, seek, left))
                step = min(WINDOW, end - seek)
                seek, at, left = seek + step, at + step / self.rate, left - step
        return starts

    @property
    def ends_at(self) -> float:
        """When its last window ends."""
        return FIRST_WINDOW_AT + sum(end - start for start, end in self.clips) / self.rate


def reports(loops: list[Loop], counted: bool = True) -> list[tuple[float, Window]]:
    """The job's window reports in time order: one loop's own, or all parts' states (engine/parts.py) at each."""
    if len(loops) == 1:
        return [
            (at, Window(seek, [], [], "en", left=left if counted else None)) for at, seek, left in loops[0].windows()
        ]
    states: list[dict[str, object]] = [
        {"start": 0, "end": loop.frames, "done": False, "window": {"seek": 0, "left": None}} for loop in loops
    ]
    events = sorted(
        [(at, index, seek, left, False) for index, loop in enumerate(loops) for at, seek, left in loop.windows()]
        + [(loop.ends_at, index, loop.frames, 0, True) for index, loop in enumerate(loops)]
    )
    out = []
    for at, index, seek, left, done in events:
        states[index] = {**states[index], "done": done, "window": {"seek": seek, "left": None if done else left}}
        total = sum(int(state["window"]["seek"]) for state in states)  # type: ignore[index]
        out.append((at, Window(total, [], [], "en", [dict(state) for state in states])))
    return out


def replay(loops: list[Loop], every: float = 0.25, counted: bool = True) -> list[tuple[float, float | None, float]]:
    """(time, ETA, percentage) every `every` s from the first window to the job's end, the reports fed as they come."""
    frames = max(loop.frames for loop in loops)
    estimate, events = Estimate(frames, STARTED), reports(loops, counted)
    samples, now = [], FIRST_WINDOW_AT
    while now < max(loop.ends_at for loop in loops):
        while events and events[0][0] <= now:
            at, window = events.pop(0)
            estimate.observe(window, at)
        samples.append((now, estimate.eta(now), estimate.progress(now)))
        now += every
    return samples


ONE_LOOP = [Loop(((0, 30000),), 1000)]
SKIPPED_STRETCH = [Loop(((0, 6000), (18000, 30000)), 1000)]  # 120 s without speech between its clips
EVEN_PARTS = [Loop(((0, 9000),), 1000), Loop(((0, 9000),), 1000), Loop(((0, 9000),), 1000)]
ONE_ENDS_EARLY = [Loop(((0, 12000),), 1000), Loop(((0, 2000),), 1000), Loop(((0, 12000),), 1000)]
# The second part spans 240 s, its clips 120 s: its clips are counted from its own first window on.
PART_SKIPS = [Loop(((0, 12000),), 1000), Loop(((0, 6000), (18000, 24000)), 1000)]
#: Loops going as fast as each other: the ETA is exact once each is timed.
EVEN = {
    "one loop": ONE_LOOP,
    "a skipped stretch": SKIPPED_STRETCH,
    "3 parts": EVEN_PARTS,
    "a part finishing early": ONE_ENDS_EARLY,
    "a part with a skipped stretch": PART_SKIPS,
}
#: Parts at different speeds (as speech of different density goes): the slowest decides.
UNEVEN = [Loop(((0, 12000),), 1000), Loop(((0, 12000),), 1150), Loop(((0, 12000),), 1300)]


@pytest.mark.parametrize("loops", EVEN.values(), ids=EVEN.keys())
def test_once_every_loop_is_timed_the_eta_is_the_time_left(loops: list[Loop]) -> None:
    end = max(loop.ends_at for loop in loops)
    first_windows = [FIRST_WINDOW_AT + min(WINDOW, loop.frames) / loop.rate for loop in loops]
    samples = replay(loops)
    assert all(eta is None for now, eta, _ in samples if now < min(first_windows)), "nothing timed yet"
    held = [(now, eta) for now, eta, _ in samples if now >= max(first_windows)]
    assert held, "the job outlasts its loops' first windows"
    for now, eta in held:
        assert eta == pytest.approx(end - now), f"at {now} s"


@pytest.mark.parametrize("loops", EVEN.values(), ids=EVEN.keys())
def test_the_percentage_never_goes_back_and_ends_as_the_share_of_time_gone(loops: list[Loop]) -> None:
    end = max(loop.ends_at for loop in loops)
    samples = replay(loops)
    shown = [progress for _, _, progress in samples]
    assert shown == sorted(shown), "never back"
    assert max(shown) <= 99.9
    now, _, last = samples[-1]
    assert last == pytest.approx(100 * (now - STARTED) / (end - STARTED), abs=0.1)


def test_parts_at_different_speeds_the_slowest_decides_within_a_quarter() -> None:
    end = max(loop.ends_at for loop in UNEVEN)
    samples = replay(UNEVEN)
    # From the slowest part's first window to the job's last second (a poll's own timing then decides).
    timed = [(now, eta) for now, eta, _ in samples if FIRST_WINDOW_AT + WINDOW / 1000 <= now <= end - 1]
    for now, eta in timed:
        assert eta is not None and abs(eta - (end - now)) <= 0.25 * (end - now), f"at {now} s"
    shown = [progress for _, _, progress in samples]
    assert shown == sorted(shown) and max(shown) <= 99.9


def test_a_timed_loop_s_own_rate_weighs_its_windows_against_the_pooled_rate_of_all() -> None:
    estimate = Estimate(18000, STARTED)
    parts = [{"start": 0, "end": 9000, "done": False, "window": {"seek": 0, "left": 9000}},
             {"start": 9000, "end": 18000, "done": False, "window": {"seek": 0, "left": 9000}}]  # fmt: skip
    estimate.observe(Window(0, [], [], "en", parts), 1.0)
    parts[1] = {**parts[1], "window": {"seek": 3000, "left": 6000}}  # 3000 frames in 2 s
    estimate.observe(Window(3000, [], [], "en", parts), 3.0)
    parts[0] = {**parts[0], "window": {"seek": 3000, "left": 6000}}  # 3000 frames in 3 s
    estimate.observe(Window(6000, [], [], "en", parts), 4.0)
    pooled = 6000 / 5  # both parts' frames over both parts' seconds
    slower = (1 * 1000 + POOLED_WINDOWS * pooled) / (1 + POOLED_WINDOWS)
    assert estimate.eta(4.0) == pytest.approx(6000 / slower)


def test_a_loop_not_yet_timed_goes_at_the_pooled_rate_but_no_faster_than_its_window_allows() -> None:
    estimate = Estimate(18000, STARTED)
    parts = [{"start": 0, "end": 9000, "done": False, "window": {"seek": 0, "left": 9000}},
             {"start": 9000, "end": 18000, "done": False, "window": {"seek": 0, "left": 9000}}]  # fmt: skip
    estimate.observe(Window(0, [], [], "en", parts), 1.0)
    parts[1] = {**parts[1], "window": {"seek": 3000, "left": 6000}}  # 1500 frames/s
    estimate.observe(Window(3000, [], [], "en", parts), 3.0)
    assert estimate.eta(3.0) == pytest.approx(9000 / 1500 - 2), "the first part, 2 s into its window at 1500/s"
    # 3 s into its first window: 1000 frames/s at most, so 6 s left at least.
    assert estimate.eta(4.0) == pytest.approx(9000 / 1000 - 3)


def test_without_the_counted_frames_a_loop_counts_its_span_and_skipped_frames_look_like_speed() -> None:
    # At the window after the stretch: 18000 frames of seek in 6 s against 12000 frames of clips left at 1000/s.
    counted = dict((now, eta) for now, eta, _ in replay(SKIPPED_STRETCH))
    spans = dict((now, eta) for now, eta, _ in replay(SKIPPED_STRETCH, counted=False))
    assert counted[7.0] == pytest.approx(12.0)
    assert spans[7.0] == pytest.approx(12000 / 3000)


def test_a_slowdown_raises_the_eta_and_holds_the_percentage_where_it_stood() -> None:
    estimate = Estimate(30000, STARTED)
    estimate.observe(Window(0, [], [], "en", left=30000), 1.0)
    estimate.observe(Window(3000, [], [], "en", left=27000), 4.0)  # 1000 frames/s: 27 s left
    assert estimate.eta(4.0) == pytest.approx(27.0)
    assert estimate.progress(4.0) == pytest.approx(100 * 4 / 31, abs=0.1)
    late = estimate.progress(15.9)  # the window should have ended at 7 s; 24 s are left after it at least
    assert late == pytest.approx(100 * 15.9 / (15.9 + 24), abs=0.1)
    estimate.observe(Window(6000, [], [], "en", left=24000), 16.0)  # 6000 frames in 15 s: 400 frames/s
    assert estimate.eta(16.0) == pytest.approx(24000 / 400)
    assert estimate.progress(16.0) == late, "16 / (16 + 60) is less than was shown: the bar waits"
    assert estimate.progress(40.0) == pytest.approx(100 * 40 / (40 + 21000 / 400), abs=0.1), "late again: 21000 after"


def test_between_windows_the_eta_counts_down_but_not_past_the_windows_not_yet_started() -> None:
    estimate = Estimate(30000, STARTED)
    estimate.observe(Window(0, [], [], "en", left=30000), 1.0)
    estimate.observe(Window(3000, [], [], "en", left=27000), 4.0)
    assert estimate.eta(5.5) == pytest.approx(25.5)
    assert estimate.eta(60.0) == pytest.approx(24.0), "a window running late still leaves the 24000 frames after it"


def test_before_any_window_has_ended_there_is_no_eta_and_the_share_of_audio_is_shown() -> None:
    estimate = Estimate(30000, STARTED)
    assert (estimate.eta(0.5), estimate.progress(0.5)) == (None, 0.0)
    estimate.observe(Window(6000, [], [], "en", left=24000), 1.0)  # a resumed loop, first seen at 60 s
    assert (estimate.eta(2.0), estimate.progress(2.0)) == (None, 20.0)


def test_a_job_whose_loops_have_all_ended_has_no_time_left() -> None:
    estimate = Estimate(6000, STARTED)
    parts = [{"start": 0, "end": 3000, "done": True, "window": {"seek": 3000, "left": None}},
             {"start": 3000, "end": 6000, "done": True, "window": {"seek": 3000, "left": None}}]  # fmt: skip
    estimate.observe(Window(6000, [], [], "en", parts), 5.0)
    assert estimate.eta(5.0) == 0.0
    assert estimate.progress(5.0) == 99.9, "100 is kept for completed"


def test_progress_counts_down_between_windows(client: FlaskClient, engine: FakeEngine) -> None:
    engine.steps = True
    engine.gate.clear()
    job_id = upload(client, wav_bytes(100)).get_json()["transcription_id"]  # windows at 0, 30, 60, 90 s
    assert engine.in_window.wait(10)
    engine.in_window.clear()
    time.sleep(0.5)  # the first window takes half a second: 60 s of audio a second
    engine.gate.let_one_through()
    assert engine.in_window.wait(10)
    first = client.get(f"/progress/{job_id}").get_json()
    time.sleep(0.5)  # the second window is held: its decoder steps go on, the clock too
    later = client.get(f"/progress/{job_id}").get_json()
    engine.gate.set()
    wait_for(client, job_id, "completed", timeout=30)
    assert first["processed_seconds"] == later["processed_seconds"] == 30
    assert first["eta_seconds"] is not None and later["eta_seconds"] < first["eta_seconds"]
    assert later["progress"] > first["progress"] > 0


def test_chunks_waiting_for_a_place_count_at_the_pace_of_the_running_ones() -> None:
    def part(seek: int, left: int | None) -> dict[str, object]:
        return {"start": 0, "end": WINDOW, "done": False, "window": {"seek": seek, "left": left}}

    estimate = Estimate(4 * WINDOW, STARTED)
    # Four chunks of one window, two places: chunks 0 and 1 run at 300 frames a second, 2 and 3 wait.
    estimate.observe(Window(0, [], [], "en", [part(0, WINDOW), part(0, WINDOW), part(0, None), part(0, None)]), 1.0)
    estimate.observe(Window(0, [], [], "en", [part(1500, 1500), part(1500, 1500), part(0, None), part(0, None)]), 6.0)
    # 1500 + 1500 + 3000 + 3000 frames left, at 2 x 300 frames a second.
    assert estimate.eta(6.0) == pytest.approx(15.0)
