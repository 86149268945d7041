"""Bounds on requests that hold an HTTP thread while the service works for them."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from whisper_flask.exceptions import Busy

#: What a refused request is told to wait before it tries again.
RETRY_AFTER_S = 2


class RequestSlots:
    """At most `size` requests of one kind at once; past that, Busy at once instead of a queue of threads.

    gunicorn has a fixed number of HTTP threads: without a bound, slow requests of one kind (a
    language detection, a client waiting for its transcript) could hold them all and leave none
    for /progress or /healthz.
    """

    def __init__(self, size: int, what: str) -> None:
        self._free = threading.BoundedSemaphore(size)
        self._what = what

    def take(self) -> None:
        """Take a slot, or raise Busy if none is free."""
        if not self._free.acquire(blocking=False):
            raise Busy(f"too many {self._what} are running; retry shortly", retry_after=RETRY_AFTER_S)

    def give(self) -> None:
        """Give back a slot taken with take()."""
        self._free.release()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A slot for the duration of a with block."""
        self.take()
        try:
            yield
        finally:
            self.give()
