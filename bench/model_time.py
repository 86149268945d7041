"""Where the shared model thread's time goes while the service runs in this process: a benchmark's profile.

It wraps three methods of whisper_flask.engine.batching.ModelThread for the length of a `with` block: calls
(encoder passes, language detection, speaker embeddings: any `run`), tallied by the function they run;
decoder steps, by the rows they carry (one per window and token: a window's first pass carries its prompt);
and idle, the thread waiting for work (the job threads filtering logits between two steps, or nothing to do).
The wrappers add two clock reads to each; the figures are the service's own otherwise.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from whisper_flask.engine import batching

ROWS = ((1, "1 row"), (3, "2-3 rows"), (8, "4-8 rows"), (32, "9-32 rows"), (10**9, "over 32 rows (first passes)"))


@contextmanager
def model_time() -> Iterator[dict[str, list[float]]]:
    """Tally the model thread's time inside the block: {what: [count, seconds]}."""
    tally: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    thread = batching.ModelThread
    take, step, submit = thread._take, thread._step, thread._submit

    def add(what: str, since: float) -> None:
        tally[what][0] += 1
        tally[what][1] += time.perf_counter() - since

    def timed_take(self: batching.ModelThread) -> Any:
        began = time.perf_counter()
        try:
            return take(self)
        finally:
            add("idle", began)

    def timed_step(self: batching.ModelThread, batch: list[Any]) -> Any:
        began = time.perf_counter()
        rows = sum(work.tokens.numel() for work in batch)
        try:
            return step(self, batch)
        finally:
            add("decoder steps, " + next(label for most, label in ROWS if rows <= most), began)

    def timed_submit(self: batching.ModelThread, work: Any) -> Any:
        if work.call is not None:
            call: Callable[[], Any] = work.call
            name = "call " + getattr(call, "__qualname__", type(call).__name__).replace(".<locals>.<lambda>", "")

            def timed_call() -> Any:
                began = time.perf_counter()
                try:
                    return call()
                finally:
                    add(name, began)

            work.call = timed_call
        return submit(self, work)

    thread._take, thread._step, thread._submit = timed_take, timed_step, timed_submit  # type: ignore[method-assign]
    try:
        yield tally
    finally:
        thread._take, thread._step, thread._submit = take, step, submit  # type: ignore[method-assign]


def describe(tally: dict[str, list[float]]) -> list[str]:
    """One line per kind of model work, the most time first, with its share of the thread's time."""
    total = sum(seconds for _, seconds in tally.values()) or 1.0
    return [
        f"{what:40} {int(count):5d} x {1000 * seconds / max(count, 1):7.1f} ms = {seconds:6.2f} s"
        f" ({100 * seconds / total:4.1f} %)"
        for what, (count, seconds) in sorted(tally.items(), key=lambda item: -item[1][1])
    ]
