"""The database schema's revision: apply the migrations (`upgrade`, what `grok-pacs db upgrade` runs) and
check a server database is at the revision this release needs (`require_head`, at every service start).

On PostgreSQL the schema changes only by an explicit `grok-pacs db upgrade`, run once per release from
one host, under a session advisory lock (a second upgrade started meanwhile waits, then finds nothing
to do); replicas never migrate at start: they refuse to start until the schema is at head, because a
rolling deploy must not have each replica racing DDL. The embedded SQLite file is owned by one process
(the one box), which brings its tables up to date itself when it opens them (`db.create_schema`).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text
from sqlalchemy.engine import Connection

from grok_pacs.config import SettingsError
from grok_pacs.store import db

MIGRATIONS = Path(__file__).with_name("migrations")
#: pg_advisory_lock key of `grok-pacs db upgrade` (any fixed 64-bit number; "GROKPACS" in ASCII).
UPGRADE_LOCK = 0x47524F4B50414353


class SchemaError(SettingsError):
    """The server database is not at the schema revision this release needs (message says what to run)."""


def _config(conn: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    return config


def head() -> str:
    """The revision this release's code needs."""
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert revision is not None, "grok_pacs/store/migrations/versions holds no revision"
    return revision


def current(engine: Engine) -> str | None:
    """The database's revision; None when it was never upgraded."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Apply every missing migration; returns (revision before, revision after).

    The embedded SQLite file keeps its tables up to date itself (`db.create_schema`, which may already have
    added a later revision's columns): there the tables are brought to this release's and the revision
    recorded (Alembic's stamp), not replayed."""
    if db.is_sqlite(engine):
        return _stamp_sqlite(engine)
    with engine.connect() as conn:
        locked = not db.is_sqlite(engine)
        if locked:  # session-level: held across the migration's transactions, released below
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": UPGRADE_LOCK})
            conn.commit()
        try:
            before = MigrationContext.configure(conn).get_current_revision()
            conn.commit()
            with conn.begin():
                command.upgrade(_config(conn), "head")
            return before, MigrationContext.configure(conn).get_current_revision() or ""
        finally:
            if locked:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": UPGRADE_LOCK})
                conn.commit()


def _stamp_sqlite(engine: Engine) -> tuple[str | None, str]:
    db.create_schema(engine)
    with engine.connect() as conn:
        before = MigrationContext.configure(conn).get_current_revision()
        conn.commit()
        with conn.begin():
            command.stamp(_config(conn), "head")
        return before, MigrationContext.configure(conn).get_current_revision() or ""


def open_schema(engine: Engine) -> None:
    """Before first use: the embedded SQLite brings its tables up to date; a server database must already
    be at this release's schema revision (`grok-pacs db upgrade`), else SchemaError."""
    if db.is_sqlite(engine):
        db.create_schema(engine)
    else:
        require_head(engine)


def require_head(engine: Engine) -> None:
    """Raise SchemaError unless the database is at this release's revision (services call it at start)."""
    found, needed = current(engine), head()
    if found != needed:
        state = "has no grok-pacs schema" if found is None else f"is at schema revision {found}"
        raise SchemaError(
            f"database_url: the database {state}, this release needs {needed}; "
            "run `grok-pacs db upgrade` once (from one host) before starting services"
        )
