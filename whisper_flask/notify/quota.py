"""How many notifications each key may ask for: NOTIFY_PER_KEY_PER_HOUR over a sliding hour.

Counted in memory, not in the store: the service is one process, the count only has to stop bursts
(a restart, which a client cannot cause, forgets at most one hour's count), and taking a place is
one step under one lock, so concurrent uploads cannot both pass the last place. A cluster would move
it into the JobStore.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from whisper_flask.exceptions import TooManyNotifications

WINDOW_S = 3600.0


class NotifyQuota:
    """A sliding hour of notifications per key; bounded memory (at most `per_hour` times per key)."""

    def __init__(self, per_hour: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_hour = per_hour
        self._clock = clock
        self._lock = threading.Lock()
        self._taken: dict[str | None, deque[float]] = {}

    @contextmanager
    def reserve(self, owner: str | None, count: int) -> Iterator[None]:
        """Take `count` places for `owner` (TooManyNotifications when full); give them back if the block fails."""
        if count == 0:
            yield
            return
        self._take(owner, count)
        try:
            yield
        except BaseException:
            self._give_back(owner, count)
            raise

    def _take(self, owner: str | None, count: int) -> None:
        now = self._clock()
        with self._lock:
            taken = self._taken.setdefault(owner, deque())
            while taken and taken[0] <= now - WINDOW_S:
                taken.popleft()
            over = len(taken) + count - self._per_hour
            if over > 0:
                # Places free up as the oldest ones leave the hour.
                free_at = taken[over - 1] + WINDOW_S if over <= len(taken) else now + WINDOW_S
                if not taken:
                    del self._taken[owner]
                raise TooManyNotifications(
                    f"this key asked for {self._per_hour} webhooks and e-mails within the last hour"
                    " (NOTIFY_PER_KEY_PER_HOUR); submit without callback_url and email, or retry later",
                    retry_after=max(1, math.ceil(free_at - now)),
                )
            taken.extend([now] * count)

    def _give_back(self, owner: str | None, count: int) -> None:
        with self._lock:
            taken = self._taken.get(owner)
            for _ in range(min(count, len(taken or ()))):
                assert taken is not None
                taken.pop()
            if taken is not None and not taken:
                del self._taken[owner]
