"""Who may do what: API keys, the failed-attempt throttle, and signed download links.

Every API route needs a key (ARCHITECTURE.md, "Access"); a key sees only its own jobs, an admin
key all of them. A signed link opens one transcript without a key until it expires.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from whisper_flask.access.keys import KeyStore
from whisper_flask.exceptions import LinkExpired, LinkRefused, MissingKey, TooManyFailures, Unauthenticated
from whisper_flask.files import atomic_write
from whisper_flask.settings import ConfigError

log = logging.getLogger(__name__)

#: The key `ensure_first_key` makes on a first start.
FIRST_KEY_NAME = "admin"
#: What a start says when keys exist but none works (never a secret).
NO_ACTIVE_KEY = (
    "every API key is revoked, so every request is refused; make one with:"
    " flask --app whisper_flask keys create --name NAME [--admin]"
)


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: a key's name, or None (auth off, or a signed link), and whether it is admin."""

    name: str | None
    admin: bool

    def owns(self, owner: str | None) -> bool:
        """Whether this principal may see and manage a job of `owner`."""
        return self.admin or (self.name is not None and owner == self.name)


#: Everyone, when WHISPER_FLASK_AUTH=off; the holder of a valid signed link, for that link.
UNRESTRICTED = Principal(None, admin=True)


class FailureThrottle:
    """At most `limit` wrong keys per address per minute; past it, that address's wrong keys wait a minute.

    Only wrong keys count, and only they are held back: a valid key passes even from a blocked
    address (offices share one NAT address; a forged X-Forwarded-For can name anyone's). The
    throttle does not guard the keys (256 random bits are not guessed); it makes a client that
    sends wrong keys back off. Memory is bounded by MAX_ADDRESSES entries in all.
    """

    WINDOW_S = 60.0
    #: Addresses remembered at most, counting and blocked together (an entry is under 1 KB).
    MAX_ADDRESSES = 10_000

    def __init__(
        self, limit: int, max_addresses: int = MAX_ADDRESSES, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._limit = limit
        self._max = max_addresses
        self._clock = clock
        self._lock = threading.Lock()
        # Addresses under their limit: their last `limit` failure times, least recently failed first.
        self._counting: OrderedDict[str, deque[float]] = OrderedDict()
        # Blocked addresses and when their block ends; every block lasts WINDOW_S, so the first ends first.
        self._blocked: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        """How many addresses are remembered."""
        with self._lock:
            return len(self._counting) + len(self._blocked)

    def check(self, address: str) -> None:
        """Raise TooManyFailures while `address` is blocked; remembers nothing new."""
        now = self._clock()
        with self._lock:
            until = self._blocked.get(address)
            if until is None:
                return
            if until <= now:
                del self._blocked[address]
                return
        wait = math.ceil(until - now)
        raise TooManyFailures(f"too many failed attempts; retry in {wait} s", retry_after=max(1, wait))

    def fail(self, address: str) -> None:
        """Count a wrong key from `address`; its `limit`-th within WINDOW_S blocks it for WINDOW_S."""
        now = self._clock()
        with self._lock:
            if self._blocked.get(address, 0.0) > now:
                return  # blocked already: its block ends when it was going to
            self._blocked.pop(address, None)
            recent = self._counting.pop(address, None)
            if recent is None:
                self._make_room(now)
                recent = deque(maxlen=self._limit)
            recent.append(now)
            if len(recent) >= self._limit and recent[0] > now - self.WINDOW_S:
                self._blocked[address] = now + self.WINDOW_S
            else:
                self._counting[address] = recent  # now the most recently failed

    def _make_room(self, now: float) -> None:
        # Caller holds the lock. Ended blocks go first, then the least recently failed address
        # that is not blocked (it may fail limit - 1 more times before its block: no harm).
        while self._blocked and next(iter(self._blocked.values())) <= now:
            self._blocked.popitem(last=False)
        if len(self._counting) + len(self._blocked) < self._max:
            return
        if self._counting:
            self._counting.popitem(last=False)
        else:
            # Every address remembered is blocked: MAX_ADDRESSES addresses each sent `limit` wrong
            # keys this minute. No per-address throttle holds back a client spread that wide, and no
            # wrong key opens anything, so the block that would end soonest is released.
            self._blocked.popitem(last=False)


class LinkSigner:
    """HMAC-SHA256 over (job id, format, expiry) with a secret kept in the data directory."""

    def __init__(self, secret_path: Path, ttl_s: int) -> None:
        self._secret = _secret(secret_path)
        self._ttl_s = ttl_s

    def sign(self, job_id: str, fmt: str) -> dict[str, str]:
        """The query parameters that open this transcript for TTL seconds from now."""
        expires = str(int(time.time()) + self._ttl_s)
        return {"expires": expires, "signature": self._signature(job_id, fmt, expires)}

    def verify(self, job_id: str, fmt: str, expires: str, signature: str) -> None:
        """Return if the link is genuine and unexpired; else LinkRefused or LinkExpired."""
        if not expires.isdigit() or len(expires) > 12:
            raise LinkRefused("the link's expiry is malformed")
        if not hmac.compare_digest(self._signature(job_id, fmt, expires), signature):
            raise LinkRefused("the link's signature does not match: it was changed or is not ours")
        if int(expires) < time.time():
            raise LinkExpired("the link has expired; ask for a new one with your API key")

    def live_token(self, principal: Principal, ttl_s: int) -> str:
        """A token that opens live sessions as `principal` for `ttl_s` seconds (a browser cannot send headers)."""
        payload = base64.urlsafe_b64encode(
            json.dumps({"key": principal.name, "admin": principal.admin, "expires": int(time.time()) + ttl_s}).encode()
        ).decode()
        return f"{payload}.{self._token_signature(payload)}"

    def token_principal(self, token: str) -> Principal | None:
        """Who a genuine, unexpired live token stands for; None for any other text."""
        payload, _, signature = token.partition(".")
        if not hmac.compare_digest(self._token_signature(payload).encode(), signature.encode()):
            return None
        fields = json.loads(base64.urlsafe_b64decode(payload))
        if fields["expires"] < time.time():
            return None
        return Principal(fields["key"], bool(fields["admin"]))

    def _token_signature(self, payload: str) -> str:
        return hmac.new(self._secret, f"live\n{payload}".encode(), hashlib.sha256).hexdigest()

    def webhook_secret(self, owner: str | None) -> str:
        """The secret that signs the webhooks of one key's jobs: another key's receiver cannot forge them."""
        return hmac.new(self._secret, f"webhook\n{owner or ''}".encode(), hashlib.sha256).hexdigest()

    def _signature(self, job_id: str, fmt: str, expires: str) -> str:
        return hmac.new(self._secret, f"{job_id}\n{fmt}\n{expires}".encode(), hashlib.sha256).hexdigest()


#: The signing secret's length in bytes (256 bits).
SECRET_BYTES = 32


def _secret(path: Path) -> bytes:
    """The signing secret, made once (32 random bytes, readable by the service's user only).

    A secret of any other length refuses the start (ConfigError): an empty one, left by a full
    disk, would sign every link with a key that anyone can compute.
    """
    try:
        with atomic_write(path, "wb", replace=False) as file:
            file.write(secrets.token_bytes(SECRET_BYTES))
    except FileExistsError:  # made by an earlier start, or by another worker just now
        pass
    secret = path.read_bytes()
    if len(secret) != SECRET_BYTES:
        raise ConfigError(
            f"{path} holds {len(secret)} bytes, not {SECRET_BYTES}: delete it and start again to make a new one"
            " (every signed link and webhook secret handed out so far then stops working)"
        )
    return secret


class AccessControl:
    """Authenticates requests by API key, with a per-address throttle on failures."""

    def __init__(self, keys: KeyStore, throttle: FailureThrottle, signer: LinkSigner, *, enabled: bool) -> None:
        self.keys = keys
        self.signer = signer
        self.enabled = enabled
        self._throttle = throttle

    def authenticate(self, secret: str | None, address: str) -> Principal:
        """The principal of a request's key; Unauthenticated or TooManyFailures otherwise."""
        if not self.enabled:
            return UNRESTRICTED
        if not secret:  # not a failure: a first request, a browser before its key is entered
            raise MissingKey("send an API key: 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        key = self.keys.authenticate(secret)
        if key is not None:  # also from a blocked address: the block holds back wrong keys only
            return Principal(key.name, key.admin)
        self._throttle.check(address)
        self._throttle.fail(address)
        raise Unauthenticated("the API key is not valid")

    def authenticate_token(self, token: str, address: str) -> Principal:
        """The principal of a live token (LinkSigner.live_token) whose key is still active; else as a wrong key."""
        if not self.enabled:
            return UNRESTRICTED
        principal = self.signer.token_principal(token)
        if principal is not None and principal.name is not None and self.keys.is_active(principal.name):
            return principal
        self._throttle.check(address)
        self._throttle.fail(address)
        raise Unauthenticated("the live token is not valid, has expired, or its key was revoked")

    def owner_active(self, owner: str | None) -> bool:
        """Whether a job of `owner` may still be opened by a signed link: its key is not revoked.

        With auth off, or for a job made with auth off (no owner), links stay valid.
        """
        return not self.enabled or owner is None or self.keys.is_active(owner)

    def announce(self) -> None:
        """At start: warn that the API is open, show a first start's new admin key once, or warn that no key works."""
        if not self.enabled:
            log.warning("WHISPER_FLASK_AUTH=off: the API is open to anyone who can reach it")
            return
        secret = self.ensure_first_key()
        if secret is not None:
            # Shown once, as Jupyter shows its token: only its hash is kept.
            log.warning(
                "\n%s\nNo API key existed, so an admin key was made. It is shown only this once:\n\n    %s\n\n"
                "Send it as 'Authorization: Bearer <key>'. More keys: flask --app whisper_flask keys create\n%s",
                "=" * 78,
                secret,
                "=" * 78,
            )
        elif self.locked_out():
            log.warning(NO_ACTIVE_KEY)

    def locked_out(self) -> bool:
        """Whether keys are needed, have been made, and every one is revoked (`flask keys create` is the way in)."""
        return self.enabled and not self.keys.any_active() and bool(self.keys.keys())

    def ensure_first_key(self) -> str | None:
        """On a first start (auth on, no key ever made), make an admin key and return its secret; else None.

        Once keys have existed, revoking them all makes no new one: a start must not hand a fresh admin
        key to whoever reads the log. `flask keys create` is the way back in.
        """
        if not self.enabled or self.keys.keys():
            return None
        return self.keys.create(FIRST_KEY_NAME, admin=True)
