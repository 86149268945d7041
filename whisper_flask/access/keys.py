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
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from whisper_flask.exceptions import ApiKeyError
from whisper_flask.jobs.records import utcnow
from whisper_flask.jobs.store import connect, storage_errors

log = logging.getLogger(__name__)

#: Prefix of every key, so that secret scanners and people recognise one.
KEY_PREFIX = "wf_"
#: last_used_at is written at most this often per key, not on every poll.
LAST_USED_RESOLUTION = timedelta(minutes=1)


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
    """The api_keys table beside the jobs in jobs.sqlite3; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._path = path
        self._last_used_failing = False  # logged once per outage, not per request
        self._db = connect(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS api_keys (name TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE,"
            " admin INTEGER NOT NULL, created_at TEXT NOT NULL, last_used_at TEXT, revoked_at TEXT)"
        )

    def create(self, name: str, *, admin: bool) -> str:
        """Make a key named `name` and return its secret, the only time it is ever available."""
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
            raise ApiKeyError("a key name is 1 to 64 letters, digits, '-', '_' or '.'")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)  # 256 bits
        try:
            with self._lock, storage_errors(self._path):
                self._db.execute(
                    "INSERT INTO api_keys (name, digest, admin, created_at) VALUES (?, ?, ?, ?)",
                    (name, _digest(secret), int(admin), utcnow()),
                )
        except sqlite3.IntegrityError:
            raise ApiKeyError(f"a key named {name!r} exists already (names are never reused)") from None
        return secret

    def revoke(self, name: str) -> None:
        """Stop a key from working, at once; its record and its jobs stay."""
        with self._lock, storage_errors(self._path):
            cursor = self._db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL", (utcnow(), name)
            )
        if cursor.rowcount == 0:
            raise ApiKeyError(f"no active key named {name!r}")

    def keys(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM api_keys ORDER BY created_at, name").fetchall()
        return [_key(row) for row in rows]

    def any_active(self) -> bool:
        """True when at least one key works."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM api_keys WHERE revoked_at IS NULL LIMIT 1").fetchone() is not None

    def is_active(self, name: str) -> bool:
        """True when a key of this name exists and is not revoked."""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM api_keys WHERE name = ? AND revoked_at IS NULL", (name,)).fetchone()
        return row is not None

    def authenticate(self, secret: str) -> ApiKey | None:
        """The active key whose secret this is, or None."""
        digest = _digest(secret)
        with self._lock:
            row = self._db.execute("SELECT * FROM api_keys WHERE digest = ?", (digest,)).fetchone()
            if row is None or row["revoked_at"] is not None or not hmac.compare_digest(row["digest"], digest):
                return None
            key = _key(row)
            now = datetime.now(timezone.utc)
            if key.last_used_at is None or now - datetime.fromisoformat(key.last_used_at) >= LAST_USED_RESOLUTION:
                self._note_use(key.name)
        return key

    def _note_use(self, name: str) -> None:
        # Caller holds the lock. Bookkeeping, best effort: a full disk (or any refusal) must not
        # refuse the request it was made for, and is logged once until a write succeeds again.
        try:
            self._db.execute("UPDATE api_keys SET last_used_at = ? WHERE name = ?", (utcnow(), name))
        except sqlite3.Error as exc:
            if not self._last_used_failing:
                log.warning("could not record when API keys were last used (%s); requests go on", exc)
            self._last_used_failing = True
        else:
            if self._last_used_failing:
                log.info("recording when API keys were last used again")
            self._last_used_failing = False

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()


def _key(row: sqlite3.Row) -> ApiKey:
    return ApiKey(row["name"], bool(row["admin"]), row["created_at"], row["last_used_at"], row["revoked_at"])
