"""Alembic's environment: migrates the connection `jobs/database.migrate` hands over (no alembic.ini, no CLI).

On PostgreSQL the migration holds an advisory lock for its transaction, so nodes that start together
migrate one after another: the second finds the tables at head and changes nothing.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

from whisper_flask.jobs.database import MIGRATION_LOCK
from whisper_flask.jobs.schema import metadata

connection: Connection = context.config.attributes["connection"]
# transactional_ddl: SQLite's DDL is transactional too, so on both databases the whole upgrade and its
# stamp are one transaction: a failure part way leaves the database as it was.
context.configure(connection=connection, target_metadata=metadata, transactional_ddl=True)
with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    context.run_migrations()
