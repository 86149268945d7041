"""The failed-key throttle: only wrong keys count, only wrong keys wait, and its memory is bounded."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import pytest
from flask import Flask

from tests.helpers import client_with_key, keyed
from whisper_flask.access.control import FailureThrottle
from whisper_flask.exceptions import TooManyFailures


class Clock:
    """A monotonic clock that a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def blocked(throttle: FailureThrottle, address: str) -> bool:
    """Whether `address` is refused now."""
    try:
        throttle.check(address)
    except TooManyFailures:
        return True
    return False


@pytest.fixture
def throttled(make_app: Callable[..., Flask]) -> Flask:
    """An app that blocks an address after 3 wrong keys, behind one trusted proxy."""
    return make_app(AUTH_FAILURES_PER_MINUTE=3, PROXY_FIX=1)


def test_wrong_keys_from_one_address_wait_a_minute(throttled: Flask) -> None:
    wrong = client_with_key(throttled, "wf_guess")
    assert [wrong.get("/queue").status_code for _ in range(3)] == [401, 401, 401]
    refused = wrong.get("/queue")
    assert (refused.status_code, refused.get_json()["code"]) == (429, "too_many_failures")
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    elsewhere = client_with_key(throttled, "wf_guess", REMOTE_ADDR="127.0.0.9").get("/queue")
    assert elsewhere.status_code == 401, "other addresses are not affected"


def test_requests_without_a_key_are_not_failures(throttled: Flask) -> None:
    anonymous = client_with_key(throttled, None)
    assert {anonymous.get("/queue").status_code for _ in range(10)} == {401}
    assert anonymous.get("/queue").get_json()["code"] == "missing_api_key"
    assert client_with_key(throttled, "wf_guess").get("/queue").status_code == 401, "ten missing keys blocked nobody"


def test_a_valid_key_passes_from_a_blocked_address(throttled: Flask) -> None:
    wrong = client_with_key(throttled, "wf_guess")
    for _ in range(3):  # AUTH_FAILURES_PER_MINUTE: the third wrong key blocks the address
        wrong.get("/queue")
    assert wrong.get("/queue").status_code == 429, "the address is blocked"
    valid = keyed(throttled, "office")
    assert valid.get("/queue").status_code == 200, "a colleague behind the same NAT address gets in"


def test_a_forged_forwarded_address_cannot_lock_out_a_valid_key(throttled: Flask) -> None:
    victim = {"HTTP_X_FORWARDED_FOR": "198.51.100.7"}
    forger = client_with_key(throttled, "wf_guess", **victim)
    assert [forger.get("/queue").status_code for _ in range(4)] == [401, 401, 401, 429]
    valid = keyed(throttled, "victim", **victim)
    assert valid.get("/queue").status_code == 200


def test_a_check_remembers_no_address() -> None:
    throttle = FailureThrottle(limit=3)
    for n in range(1000):
        throttle.check(f"10.0.{n // 256}.{n % 256}")
    assert len(throttle) == 0


def test_a_block_ends_a_window_after_the_failure_that_set_it() -> None:
    clock = Clock()
    throttle = FailureThrottle(limit=2, clock=clock)
    throttle.fail("a")
    clock.now += 30
    throttle.fail("a")
    assert blocked(throttle, "a")
    clock.now += FailureThrottle.WINDOW_S - 1
    assert blocked(throttle, "a")
    clock.now += 1
    assert not blocked(throttle, "a")


def test_failures_older_than_the_window_do_not_count() -> None:
    clock = Clock()
    throttle = FailureThrottle(limit=2, clock=clock)
    throttle.fail("a")
    clock.now += FailureThrottle.WINDOW_S + 1
    throttle.fail("a")
    assert not blocked(throttle, "a")


def test_a_full_table_forgets_the_least_recently_failed_address_that_is_not_blocked() -> None:
    throttle = FailureThrottle(limit=2, max_addresses=3)
    throttle.fail("blocked"), throttle.fail("blocked")
    throttle.fail("old"), throttle.fail("recent")
    throttle.fail("old")  # "old" has failed again since "recent": "recent" is now the least recent
    throttle.fail("new")  # the table is full
    assert blocked(throttle, "blocked"), "eviction never releases a blocked address while others count"
    throttle.fail("old")
    assert blocked(throttle, "old"), "its count survived"
    throttle.fail("recent")
    assert not blocked(throttle, "recent"), "its count was forgotten: one failure since"
    assert len(throttle) == 3


def test_when_every_address_is_blocked_the_block_ending_soonest_goes() -> None:
    clock = Clock()
    throttle = FailureThrottle(limit=1, max_addresses=2, clock=clock)
    throttle.fail("first")
    clock.now += 1
    throttle.fail("second")
    throttle.fail("third")
    assert (blocked(throttle, "first"), blocked(throttle, "second"), blocked(throttle, "third")) == (False, True, True)


def test_the_table_stays_bounded_in_entries_and_memory() -> None:
    throttle = FailureThrottle(limit=10)
    tracemalloc.start()
    try:
        for n in range(3 * FailureThrottle.MAX_ADDRESSES):
            for _ in range(1 if n % 2 else 10):  # half of them blocked
                throttle.fail(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(throttle) == FailureThrottle.MAX_ADDRESSES
    assert peak < 16 * 2**20, f"{peak / 2**20:.1f} MiB for {FailureThrottle.MAX_ADDRESSES} addresses"
