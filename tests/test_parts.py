"""A long job in parts: where it is cut, how its parts' progress adds up, and that a resume continues each part."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from whisper.audio import N_FRAMES

from tests.helpers import SPOKEN, speech, submit, wait_for
from whisper_flask.engine.parts import MIN_PART_FRAMES, Part, PartedProgress, part_clips, plan_parts, run_parts
from whisper_flask.engine.windows import Window
from whisper_flask.extension import get_service
from whisper_flask.jobs.registry import JobCancelled
from whisper_flask.jobs.resume import load_resume, save_resume


def loud_mel(frames: int, quiet_at: tuple[int, ...] = ()) -> torch.Tensor:
    """A spectrogram (with Whisper's N_FRAMES of padding) that is loud everywhere but 0.5 s at each given frame."""
    mel = torch.ones(80, frames + N_FRAMES)
    for frame in quiet_at:
        mel[:, frame - 25 : frame + 25] = -1.0
    return mel


def segment(start: float, end: float, text: str) -> dict[str, Any]:
    """A segment as Whisper's loop makes it (relative to its part)."""
    return {"id": 0, "seek": int(start * 100), "start": start, "end": end, "text": text, "tokens": [1]}


def test_each_cut_falls_in_the_pause_nearest_its_even_spacing() -> None:
    parts = plan_parts(loud_mel(27000, quiet_at=(9300, 17800)), 27000, [(0, 27000)], places=3)
    assert [(part.start, part.end) for part in parts] == [(0, parts[1].start), (parts[1].start, parts[2].start),
                                                         (parts[2].start, 27000)]  # fmt: skip
    assert abs(parts[1].start - 9300) <= 25 and abs(parts[2].start - 17800) <= 25


def test_parts_share_the_clips_to_transcribe_not_the_timeline() -> None:
    mel = loud_mel(39000)
    mel[:, 9000:30000] = -1.0  # the stretch without speech that the clips skip
    clips = [(0, 9000), (30000, 39000)]
    parts = plan_parts(mel, 39000, clips, places=2)
    assert [sum(end - start for start, end in part_clips(clips, part)) for part in parts] == [9000, 9000]


@pytest.mark.parametrize(
    ("frames", "places", "count"),
    [
        (MIN_PART_FRAMES * 2 - 1, 8, 1),  # under two parts' worth: one loop
        (MIN_PART_FRAMES * 2, 8, 2),
        (MIN_PART_FRAMES * 20, 8, 8),  # never more than the places
        (MIN_PART_FRAMES * 20, 1, 1),  # no free place: one loop, as before parts
    ],
)
def test_parts_are_no_more_than_the_places_and_at_least_two_windows_long(frames: int, places: int, count: int) -> None:
    parts = plan_parts(loud_mel(frames), frames, [(0, frames)], places)
    assert len(parts) == count
    assert all(part.end - part.start >= MIN_PART_FRAMES - 500 for part in parts)


def test_progress_adds_the_parts_and_shows_segments_only_in_order() -> None:
    reported: list[Window] = []
    progress = PartedProgress.fresh([Part(0, 6000), Part(6000, 12000)], "en", reported.append)
    progress.hook(1)(Window(1500, [segment(0, 15, " second")], [7], "en"))
    assert (reported[-1].seek, reported[-1].segments) == (1500, []), "part 2's text waits for part 1"
    progress.hook(0)(Window(3000, [segment(0, 30, " first")], [5], "en"))
    assert [s["text"] for s in reported[-1].segments] == [" first"]
    progress.finish(0, [segment(0, 30, " first"), segment(30, 60, " more")])
    last = reported[-1]
    assert last.seek == 6000 + 1500
    assert [(s["id"], s["start"], s["seek"], s["text"]) for s in last.segments] == [
        (0, 0, 0, " first"), (1, 30, 3000, " more"), (2, 60, 6000, " second")]  # fmt: skip


def test_a_saved_state_resumes_each_part_at_its_own_window(tmp_path: Path) -> None:
    reported: list[Window] = []
    progress = PartedProgress.fresh([Part(0, 6000), Part(6000, 12000), Part(12000, 18000)], "de", reported.append)
    progress.finish(0, [segment(0, 60, " eins")])
    progress.hook(1)(Window(3000, [segment(0, 30, " zwei")], [11, 12], "de"))
    save_resume(tmp_path, "job", reported[-1])

    resumed = PartedProgress.resumed(load_resume(tmp_path, "job"), reported.append)  # type: ignore[arg-type]
    assert [resumed.done(index) for index in range(3)] == [True, False, False]
    assert resumed.window(1) == Window(3000, [segment(0, 30, " zwei")], [11, 12], "de")
    assert resumed.window(2) is None, "a part that never started starts afresh"
    assert resumed.language == "de"


def test_a_long_job_runs_in_parts_and_a_resume_gives_the_uninterrupted_transcript(
    make_real_app, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    audio = speech(tmp_path / "long.wav", 150, list(SPOKEN))
    first = make_real_app(MAX_WORKERS=1)
    alone = submit(first.test_client(), audio)
    wait_for(first.test_client(), alone, "completed", timeout=300)
    assert "transcribing in 2 parts side by side" in caplog.text
    expected = (get_service(first).settings.TRANSCRIPT_DIR / f"{alone}.txt").read_text()

    interrupted = submit(first.test_client(), audio)
    service = get_service(first)
    deadline = time.monotonic() + 300
    # Both parts past their first window: the state to resume has two loops in it.
    while not ((window := load_resume(service.settings.TRANSCRIPT_DIR, interrupted)) and all(
            part["window"]["seek"] for part in window.parts)):  # fmt: skip
        assert time.monotonic() < deadline, f"job {interrupted}'s parts never both got past their first window"
        time.sleep(0.05)
    service.stop()
    assert service.parts.registry.view(interrupted).job.status.value == "pending"

    restarted = get_service(make_real_app(MAX_WORKERS=1))
    while not restarted.parts.registry.view(interrupted).job.status.terminal:
        assert time.monotonic() < deadline, f"job {interrupted} did not finish after the restart"
        time.sleep(0.1)
    assert f"job {interrupted} resumes at" in caplog.text
    assert (restarted.settings.TRANSCRIPT_DIR / f"{interrupted}.txt").read_text() == expected


def test_a_failing_part_stops_the_others_at_their_next_step_and_the_job_fails_with_its_error() -> None:
    windows_after_failure: list[int] = []
    failed = threading.Event()
    progress = PartedProgress.fresh([Part(0, 6000), Part(6000, 12000), Part(12000, 18000)], "en", lambda window: None)

    all_started = threading.Barrier(3, timeout=10)

    def run_part(index: int) -> list[dict[str, Any]]:
        on_window, check = progress.hook(index), progress.checked(lambda: None)
        all_started.wait()  # a part not started when another fails never starts
        if index == 0:
            on_window(Window(0, [], [], "en"))
            failed.set()
            raise RuntimeError("the model broke in part 0")
        assert failed.wait(10)
        for seek in range(1, 100):  # a loop that would go on for ever, but for its hook
            windows_after_failure.append(seek)
            check()  # its next decoder step
            on_window(Window(seek * 3000, [], [], "en"))
        return []

    before = threading.active_count()
    with pytest.raises(RuntimeError, match="the model broke in part 0"):
        run_parts(progress, run_part, len(progress.parts))
    assert windows_after_failure == [1, 1], "each other part stops at its first step after the failure"
    assert threading.active_count() == before, "every part's thread has ended"


def test_a_cancel_stops_every_part_through_an_except_exception_in_their_loops() -> None:
    progress = PartedProgress.fresh([Part(0, 6000), Part(6000, 12000)], "en", lambda window: None)
    cancelled = threading.Event()
    steps = [0, 0]

    def check() -> None:
        if cancelled.is_set():
            raise JobCancelled("the job")

    def run_part(index: int) -> list[dict[str, Any]]:
        step_check = progress.checked(check)
        for _ in range(500):  # decoder steps
            try:
                step_check()
            except Exception:  # what a broad handler in library code would do to a stop
                continue
            steps[index] += 1
            if steps[index] == 3:
                cancelled.set()
            time.sleep(0.001)
        return []

    with pytest.raises(JobCancelled):
        run_parts(progress, run_part, len(progress.parts))
    assert max(steps) < 50, "a part went on after the cancel"


def test_parts_run_no_more_than_the_places_at_once_and_each_runs_once() -> None:
    parts = [Part(index * 3000, (index + 1) * 3000) for index in range(5)]
    progress = PartedProgress.fresh(parts, "en", lambda window: None)
    lock, running, most, ran = threading.Lock(), [0], [0], []

    def run_part(index: int) -> list[dict[str, Any]]:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            ran.append(index)
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return [segment(0, 1, f"part {index}")]

    segments = run_parts(progress, run_part, 2)
    assert most == [2] and sorted(ran) == [0, 1, 2, 3, 4]
    assert [segment["text"] for segment in segments] == [f"part {index}" for index in range(5)]
