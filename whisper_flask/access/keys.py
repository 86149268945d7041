"""API keys: random secrets shown once, stored only as SHA-256 hashes in the job database.

A key has 256 bits of entropy, so a plain SHA-256 is enough to make the stored hash useless to a
reader of the database (a slow password hash protects low-entropy secrets, not these), and it lets
a request's key be found by an index lookup. The hashes are still compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Engine, bindparam, insert, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from whisper_flask.exceptions import ApiKeyError
from whisper_flask.jobs.database import READ_ONLY, database_path, storage_errors
from whisper_flask.jobs.records import utcnow
from whisper_flask.jobs.schema import api_keys

log = logging.getLogger(__name__)

#: Prefix of every key, so that secret scanners and people recognise one.
KEY_PREFIX = "wf_"
#: last_used_at is written at most this often per key, not on every poll.
LAST_USED_RESOLUTION = timedelta(minutes=1)

# Built once, their values bound at each call (as jobs/store.py's): a request's lookup stays cheap.
_BY_DIGEST = select(api_keys).where(api_keys.c.digest == bindparam("wanted"))
_ACTIVE = api_keys.c.revoked_at.is_(None)
_ANY_ACTIVE = select(api_keys.c.name).where(_ACTIVE).limit(1)
_IS_ACTIVE = select(api_keys.c.name).where(api_keys.c.name == bindparam("wanted"), _ACTIVE)
_ALL = select(api_keys).order_by(api_keys.c.created_at, api_keys.c.name)
_REVOKE = update(api_keys).where(api_keys.c.name == bindparam("wanted"), _ACTIVE)
_NOTE_USE = update(api_keys).where(api_keys.c.name == bindparam("wanted"))


@dataclass(frozen=True)
class ApiKey:
    """A key's record (never its secret)."""

    name: str
    admin: bool
    created_at: str
    last_used_at: str | None
    revoked_at: str | None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


class KeyStore:
    """The api_keys table beside the jobs, on the job store's engine; safe to share between threads."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._reader = engine.execution_options(**{READ_ONLY: True})
        self._path = database_path(engine)
        self._last_used_failing = False  # logged once per outage, not per request

    def _read(self, statement: Any, **values: Any) -> list[RowMapping]:
        with self._reader.connect() as connection:
            return list(connection.execute(statement, values).mappings())

    def create(self, name: str, *, admin: bool) -> str:
        """Make a key named `name` and return its secret, the only time it is ever available."""
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
            raise ApiKeyError("a key name is 1 to 64 letters, digits, '-', '_' or '.'")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)  # 256 bits
        try:
            with storage_errors(self._path), self.engine.begin() as connection:
                connection.execute(
                    insert(api_keys).values(name=name, digest=_digest(secret), admin=int(admin), created_at=utcnow())
                )
        except IntegrityError:
            raise ApiKeyError(f"a key named {name!r} exists already (names are never reused)") from None
        return secret

    def revoke(self, name: str) -> None:
        """Stop a key from working, at once; its record and its jobs stay."""
        with storage_errors(self._path), self.engine.begin() as connection:
            revoked = connection.execute(_REVOKE, {"wanted": name, "revoked_at": utcnow()}).rowcount
        if revoked == 0:
            raise ApiKeyError(f"no active key named {name!r}")

    def keys(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        return [_key(row) for row in self._read(_ALL)]

    def any_active(self) -> bool:
        """True when at least one key works."""
        return bool(self._read(_ANY_ACTIVE))

    def is_active(self, name: str) -> bool:
        """True when a key of this name exists and is not revoked."""
        return bool(self._read(_IS_ACTIVE, wanted=name))

    def authenticate(self, secret: str) -> ApiKey | None:
        """The active key whose secret this is, or None."""
        digest = _digest(secret)
        rows = self._read(_BY_DIGEST, wanted=digest)
        if not rows or rows[0]["revoked_at"] is not None or not hmac.compare_digest(rows[0]["digest"], digest):
            return None
        key = _key(rows[0])
        now = datetime.now(timezone.utc)
        if key.last_used_at is None or now - datetime.fromisoformat(key.last_used_at) >= LAST_USED_RESOLUTION:
            self._note_use(key.name)
        return key

    def _note_use(self, name: str) -> None:
        # Bookkeeping, best effort: a full disk (or any refusal) must not refuse the request it was
        # made for, and is logged once until a write succeeds again.
        try:
            with self.engine.begin() as connection:
                connection.execute(_NOTE_USE, {"wanted": name, "last_used_at": utcnow()})
        except SQLAlchemyError as exc:
            if not self._last_used_failing:
                log.warning("could not record when API keys were last used (%s); requests go on", _reason(exc))
            self._last_used_failing = True
        else:
            if self._last_used_failing:
                log.info("recording when API keys were last used again")
            self._last_used_failing = False

    def close(self) -> None:
        """Close the engine's connections."""
        self.engine.dispose()


def _reason(exc: SQLAlchemyError) -> object:
    # The driver's own message: SQLAlchemy's adds the statement and a link.
    return getattr(exc, "orig", None) or exc


def _key(row: RowMapping) -> ApiKey:
    return ApiKey(row["name"], bool(row["admin"]), row["created_at"], row["last_used_at"], row["revoked_at"])
