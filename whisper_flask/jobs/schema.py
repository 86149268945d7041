"""The job database's tables, declared once for SQLite and PostgreSQL (ARCHITECTURE.md, "Ports").

The stores query these tables with SQLAlchemy Core, and the migrations (whisper_flask/migrations/)
create and change them. Times are ISO 8601 text (`records.iso`), as the records serve them, except
the cluster's leases and heartbeats: those are the database's own clock (`now()`), so that the
nodes' clocks never have to agree.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

# SQLite's AUTOINCREMENT keys are INTEGER; PostgreSQL's BIGINT identity.
_Key = BigInteger().with_variant(Integer(), "sqlite")

jobs = Table(
    "jobs",
    metadata,
    Column("seq", _Key, primary_key=True, autoincrement=True),
    Column("id", Text, nullable=False, unique=True),
    Column("filename", Text),
    Column("upload_name", Text),
    Column("options", Text),
    Column("model", Text),
    Column("created_at", Text),
    Column("status", Text),
    Column("stage", Text),
    Column("progress", Float),
    Column("stage_progress", Float),
    Column("duration", Float),
    Column("processed_seconds", Float),
    Column("eta_seconds", Float),
    Column("language", Text),
    Column("error", Text),
    Column("error_code", Text),
    Column("started_at", Text),
    Column("finished_at", Text),
    Column("attempts", Integer),
    Column("expired_at", Text),
    Column("owner", Text),
    Column("isolated", Boolean),
    Column("source_url", Text),
    Column("callback_url", Text),
    Column("notify_email", Text),
    # The cluster mode's lease: which worker runs the job, and until when it may without a heartbeat.
    Column("lease_owner", Text),
    Column("lease_until", DateTime(timezone=True)),
    Index("jobs_status", "status", "seq"),
    Index("jobs_owner", "owner", "seq"),
    sqlite_autoincrement=True,  # on SQLite a deleted seq (or id) is never reused, as on PostgreSQL
)

notifications = Table(
    "notifications",
    metadata,
    Column("id", _Key, primary_key=True, autoincrement=True),
    Column("job_id", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("target", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", Text, nullable=False),
    Column("last_error", Text),
    Column("delivered_at", Text),
    # Which node is delivering it, and until when: with several API nodes exactly one sends each.
    Column("claimed_by", Text),
    Column("claimed_until", DateTime(timezone=True)),
    UniqueConstraint("job_id", "kind"),
    Index("notifications_due", "state", "next_attempt_at"),
    sqlite_autoincrement=True,
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("name", Text, primary_key=True),
    Column("digest", Text, nullable=False, unique=True),
    Column("admin", Integer, nullable=False),
    Column("created_at", Text, nullable=False),
    Column("last_used_at", Text),
    Column("revoked_at", Text),
)

# The cluster's worker nodes, each a row it refreshes with every heartbeat (GET /queue lists them).
workers = Table(
    "workers",
    metadata,
    Column("name", Text, primary_key=True),
    Column("host", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("running", Integer, nullable=False),
    Column("capacity", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
)
