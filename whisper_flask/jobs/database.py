"""The job database's engine: SQLite in TRANSCRIPT_DIR, or PostgreSQL (DATABASE_URL), migrated when opened.

Both stores (jobs/store.py, access/keys.py) take the one engine `open_engine` returns; schema.py
declares its tables and whisper_flask/migrations/ makes them (ARCHITECTURE.md, "Ports").
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import URL, Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.pool import QueuePool

from whisper_flask.exceptions import DatabaseUnavailable, StorageFull
from whisper_flask.files import FILE_MODE, create_private

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
#: The key of the PostgreSQL advisory lock that makes nodes starting together migrate one after another.
MIGRATION_LOCK = zlib.crc32(b"whisper_flask.migrations")
#: An execution option: a read, one statement, needs no transaction (nor, on SQLite, the write lock).
READ_ONLY = "whisper_flask_read_only"

# Alembic keeps the running migration's context in module globals: one migration at a time per process.
_migrating = threading.Lock()

#: SQLite's primary result codes SQLITE_FULL and SQLITE_IOERR (extended codes keep them in their low
#: byte; typeshed lacks the module's constants).
_SQLITE_FULL, _SQLITE_IOERR = 13, 10
#: PostgreSQL's SQLSTATE disk_full.
_PG_DISK_FULL = "53100"
#: Free space under which an I/O error is taken for a full disk (a WAL write can fail as IOERR on ENOSPC).
_NEARLY_FULL_BYTES = 1 << 20


def open_engine(location: str | Path) -> Engine:
    """The engine of a PostgreSQL URL or of an SQLite file's path, its tables migrated to this version."""
    if isinstance(location, str) and "://" in location:
        engine = _postgres_engine(location)
    else:
        engine = _sqlite_engine(Path(location))
    try:
        with storage_errors(database_path(engine)):
            migrate(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _postgres_engine(url: str) -> Engine:
    scheme, rest = url.split("://", 1)
    if scheme in ("postgres", "postgresql"):
        scheme = "postgresql+psycopg"  # psycopg 3; SQLAlchemy's plain postgresql:// means psycopg2
    # pool_pre_ping: a connection the database dropped (a restart, a failover) is replaced before use,
    # so the next call after a restart works. The URL is never logged: it may hold a password.
    return create_engine(
        f"{scheme}://{rest}",
        pool_pre_ping=True,
        # gunicorn's 16 HTTP threads (each holds one connection at a time), or a worker's job threads,
        # heartbeat and reconciler, without waiting for one another: a node at most 24 of PostgreSQL's 100.
        pool_size=8,
        max_overflow=16,
        hide_parameters=True,  # errors are logged; parameters hold callback URLs and addresses
        connect_args={"connect_timeout": 10},
    )


def _sqlite_engine(path: Path) -> Engine:
    # One connection for both stores, handed to one caller at a time: the pool of one is the lock
    # that serialises them (no waiting for a timeout-based retry), as one writer is all SQLite allows.
    engine = create_engine(
        URL.create("sqlite", database=str(path)),  # the path as it is, whatever its characters
        creator=lambda: connect(path),
        poolclass=QueuePool,
        pool_size=1,
        max_overflow=0,
        pool_timeout=None,
        hide_parameters=True,
    )

    @event.listens_for(engine, "begin")
    def begin(connection: Connection) -> None:
        # The connection is in autocommit mode (connect()), so SQLAlchemy's transactions are ours to begin:
        # IMMEDIATE takes the write lock at once, so another process (`flask keys`) waits for it by the busy
        # timeout instead of failing halfway. A read is one statement and needs none.
        if not connection.get_execution_options().get(READ_ONLY):
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def connect(path: Path) -> sqlite3.Connection:
    """Open jobs.sqlite3: 0600, WAL, every commit synced, waiting for another process's write."""
    # Made 0600 before SQLite opens it: SQLite gives -wal and -shm the database file's mode.
    create_private(path)
    for journal in (path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")):
        if journal.exists():  # left by an older version, made under the umask
            journal.chmod(FILE_MODE)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA busy_timeout = 5000")  # `flask keys` in another process writes to the same file
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # a 202 means the job survives a power cut
    return db


def database_path(engine: Engine) -> Path | None:
    """An SQLite engine's file, None for PostgreSQL."""
    return Path(engine.url.database) if engine.dialect.name == "sqlite" and engine.url.database else None


def migrate(engine: Engine) -> None:
    """Bring the database's tables to this version (whisper_flask/migrations/); run at every open."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with _migrating, engine.connect() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        connection.commit()


@contextlib.contextmanager
def storage_errors(database: Path | None) -> Iterator[None]:
    """A database refusing a write for want of space raises StorageFull; other errors (a failing disk) pass."""
    try:
        yield
    except (sqlite3.Error, DBAPIError) as exc:
        original: Any = exc.orig if isinstance(exc, DBAPIError) else exc
        if _full(original, database):
            raise StorageFull(f"the job database cannot be written: {original}") from exc
        if database is None and isinstance(exc, OperationalError | InterfaceError):
            # PostgreSQL gone (a restart, the network): the caller waits and tries again (a job), or
            # answers 503 (a request). The error's text may name the server: it is logged, not shown.
            raise DatabaseUnavailable("the job database does not answer; retrying") from exc
        raise


def _full(error: Any, database: Path | None) -> bool:
    if getattr(error, "sqlstate", None) == _PG_DISK_FULL:
        return True
    code = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF
    return code == _SQLITE_FULL or (code == _SQLITE_IOERR and database is not None and _nearly_full(database.parent))


def _nearly_full(directory: Path) -> bool:
    try:
        stats = os.statvfs(directory)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < _NEARLY_FULL_BYTES
