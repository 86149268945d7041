"""The four tables: jobs, notifications, api_keys, workers; and the adoption of a database made before migrations.

Revision ID: 0001
Revises: (none)

The tables are declared here as they were at this revision, not imported from schema.py: a later
revision changes them from this state, whatever schema.py says by then (tests/test_database.py checks
that the migrated tables are schema.py's).

A jobs.sqlite3 made before migrations has some of these tables, made by hand: typeless columns added
by ALTER TABLE, a `link_base` column no field reads, no alembic_version. Its tables keep their rows and
their columns; what is missing (columns, indexes, tables) is added, and Alembic then stamps it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_Key = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _tables() -> sa.MetaData:
    metadata = sa.MetaData()
    sa.Table(
        "jobs",
        metadata,
        sa.Column("seq", _Key, primary_key=True, autoincrement=True),
        sa.Column("id", sa.Text, nullable=False, unique=True),
        *(sa.Column(name, sa.Text) for name in ("filename", "upload_name", "options", "model", "created_at", "status",
                                                "stage")),
        *(sa.Column(name, sa.Float) for name in ("progress", "stage_progress", "duration", "processed_seconds",
                                                 "eta_seconds")),
        *(sa.Column(name, sa.Text) for name in ("language", "error", "error_code", "started_at", "finished_at")),
        sa.Column("attempts", sa.Integer),
        sa.Column("expired_at", sa.Text),
        sa.Column("owner", sa.Text),
        sa.Column("isolated", sa.Boolean),
        *(sa.Column(name, sa.Text) for name in ("source_url", "callback_url", "notify_email", "lease_owner")),
        sa.Column("lease_until", sa.DateTime(timezone=True)),
        sa.Index("jobs_status", "status", "seq"),
        sa.Index("jobs_owner", "owner", "seq"),
        sqlite_autoincrement=True,  # as the tables made before migrations: a deleted seq is never reused
    )  # fmt: skip
    sa.Table(
        "notifications",
        metadata,
        sa.Column("id", _Key, primary_key=True, autoincrement=True),
        *(sa.Column(name, sa.Text, nullable=False) for name in ("job_id", "kind", "target", "state")),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Text, nullable=False),
        *(sa.Column(name, sa.Text) for name in ("last_error", "delivered_at", "claimed_by")),
        sa.Column("claimed_until", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("job_id", "kind"),
        sa.Index("notifications_due", "state", "next_attempt_at"),
        sqlite_autoincrement=True,
    )
    sa.Table(
        "api_keys",
        metadata,
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("digest", sa.Text, nullable=False, unique=True),
        sa.Column("admin", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("last_used_at", sa.Text),
        sa.Column("revoked_at", sa.Text),
    )
    sa.Table(
        "workers",
        metadata,
        sa.Column("name", sa.Text, primary_key=True),
        *(sa.Column(name, sa.Text, nullable=False) for name in ("host", "model")),
        *(sa.Column(name, sa.Integer, nullable=False) for name in ("running", "capacity")),
        *(sa.Column(name, sa.DateTime(timezone=True), nullable=False) for name in ("started_at", "heartbeat_at")),
    )
    return metadata


def upgrade() -> None:
    """Create each table, or complete one an older version made: its missing columns and indexes added."""
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    existing = set(inspector.get_table_names())
    for table in _tables().sorted_tables:
        if table.name not in existing:
            table.create(bind)
            continue
        # An older version's table: its rows and its extra columns (link_base) stay. Every column it
        # lacks is nullable, as the older version's own ALTER TABLEs were.
        columns = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in columns:
                op.add_column(table.name, sa.Column(column.name, column.type))
        indexes = {index["name"] for index in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(bind)


def downgrade() -> None:
    """Drop the four tables (and every record in them)."""
    for table in reversed(_tables().sorted_tables):
        op.drop_table(table.name)
