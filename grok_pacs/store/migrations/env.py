"""Alembic's environment: migrations run on the connection `grok_pacs.store.schema` hands over (it holds the
advisory lock on PostgreSQL), never on one this file opens from a URL."""

from __future__ import annotations

from alembic import context

from grok_pacs.store import db

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=db.metadata, render_as_batch=db.is_sqlite(connection))
with context.begin_transaction():
    context.run_migrations()
