"""The database: one SQLAlchemy Core schema (index, outbox, results and reviewers tables), two dialects.

Embedded (the one-box default): the SQLite file `data_dir/index.sqlite`, WAL journal, `synchronous=FULL`
(a committed row survives a crash; readers never block the listener) and a busy timeout, set on every new
connection. A server: PostgreSQL through psycopg 3, `GROK_PACS_DATABASE_URL=postgresql+psycopg://...`.

`transaction()` is the one way to touch the tables. Writes on SQLite start with BEGIN IMMEDIATE (the
write lock taken up front: two writers never deadlock upgrading a read lock); reads start with a plain
BEGIN (one WAL snapshot). On PostgreSQL writes run at READ COMMITTED, where every claim is one
conditional statement, and reads at REPEATABLE READ (one snapshot across several SELECTs).

`now()` is the database's clock on PostgreSQL (leases and the quiet period must not depend on which host
asks); the embedded SQLite is on one host, whose clock it uses.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy.orm  # noqa: F401 - see below
from sqlalchemy import (
    Column,
    Double,
    Engine,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    bindparam,
    create_engine,
    event,
    func,
    inspect,
    literal,
    true,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

BUSY_TIMEOUT_MS = 30_000
PG_CONNECT_TIMEOUT_S = 10
# sqlalchemy.orm is imported above, once, at start: a Core statement given a str subclass (a pydicom UID)
# inspects it through the ORM, and doing so while kombu's SQLAlchemy transport imports sqlalchemy.orm in
# another thread failed with a partially initialised module (seen in tests/ingest/test_uploader.py, 2 runs in 6).

#: Any failure of the database (unreachable, locked beyond the busy timeout, pool exhausted, SQL error).
DatabaseError = sa_exc.SQLAlchemyError
#: A failure worth retrying later: the database is down, busy or locked (not a bug in a statement).
TransientDatabaseError = sa_exc.OperationalError

metadata = MetaData()

instances = Table(
    "instances",
    metadata,
    Column("sop_uid", Text, primary_key=True),
    Column("study_uid", Text, nullable=False),
    Column("series_uid", Text, nullable=False),
    Column("sop_class_uid", Text, nullable=False),
    Column("modality", Text, nullable=False),
    Column("laterality", Text, nullable=False),
    Column("frames", Integer, nullable=False),
    Column("size", Integer, nullable=False),
    Column("path", Text, nullable=False),
    Column("received_at", Double, nullable=False),
    Column("calling_ae", Text, nullable=False),
    Column("acquisition_datetime", Text, nullable=False),
    Column("transfer_syntax", Text, nullable=False),
    # LOCAL until the per-host uploader has put the file into the object store and recorded its key here
    # (grok_pacs.store.uploads); indexed, so finding what is left to upload never scans every instance.
    Column("upload_state", Text, nullable=False, server_default="LOCAL"),
    Column("blob_key", Text, nullable=False, server_default=""),
    # The listener that received it (Settings.node_id; migration 0003): only that host has the local file,
    # so on a shared server database only its recovery and its uploader act on the row.
    Column("received_by", Text, nullable=False, server_default=""),
    Index("instances_by_study", "study_uid"),
    Index("instances_by_upload_state", "upload_state", "received_at"),
)

studies = Table(
    "studies",
    metadata,
    Column("study_uid", Text, primary_key=True),
    Column("state", Text, nullable=False),
    Column("version", Integer, nullable=False, server_default="0"),
    Column("detail", Text, nullable=False, server_default=""),
    Column("instance_count", Integer, nullable=False, server_default="0"),
    Column("first_received_at", Double, nullable=False),
    Column("last_received_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),  # database time (the quiet period is measured on it)
    Column("claimed_by", Text, nullable=False, server_default=""),  # the job analysing this version
    Column("claimed_at", Double),
    Index("studies_by_state", "state", "last_received_at"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("sr_uid", Text, primary_key=True),
    Column("study_uid", Text, nullable=False),
    Column("study_version", Integer, nullable=False),
    Column("bundle_version", Text, nullable=False),
    Column("eye", Text, nullable=False),
    Column("path", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=False, server_default=""),
    Column("claimed_by", Text, nullable=False, server_default=""),
    Column("claimed_at", Double),
    Column("destination", Text, nullable=False, server_default=""),
    Column("note", Text, nullable=False, server_default=""),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("delivered_at", Double),
    Column("kind", Text, nullable=False, server_default="SR"),
    Index("outbox_study", "study_uid", "study_version"),
    Index("outbox_state", "state"),
)

# One row per eye's AI result (its SR's SOP Instance UID) and its life after delivery: delivered, replaced
# by a later study version, withdrawn, reviewed (grok_pacs.store.register; migration 0004). The worklist
# filters on state and time, label and study, hence the indexes.
results = Table(
    "results",
    metadata,
    Column("sr_uid", Text, primary_key=True),
    Column("study_uid", Text, nullable=False),
    Column("study_version", Integer, nullable=False),
    Column("bundle_version", Text, nullable=False),
    Column("eye", Text, nullable=False),
    Column("label", Text, nullable=False, server_default=""),
    Column("probability", Double),
    Column("disposition", Text, nullable=False, server_default=""),
    Column("gradability", Text, nullable=False, server_default=""),
    Column("pdf_uid", Text, nullable=False, server_default=""),
    Column("cfp_uid", Text, nullable=False, server_default=""),
    Column("oct_uid", Text, nullable=False, server_default=""),
    Column("state", Text, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("delivered_at", Double),
    Column("replaced_by", Text, nullable=False, server_default=""),
    Column("withdraw_reason", Text, nullable=False, server_default=""),
    Column("rejection_uid", Text, nullable=False, server_default=""),
    Column("review_outcome", Text, nullable=False, server_default=""),
    Column("reviewed_label", Text, nullable=False, server_default=""),
    Column("reviewer", Text, nullable=False, server_default=""),
    Column("review_note", Text, nullable=False, server_default=""),
    Column("reviewed_at", Double),
    Column("verified_uid", Text, nullable=False, server_default=""),
    Index("results_by_state", "state", "created_at"),
    Index("results_by_label", "label"),
    Index("results_by_study", "study_uid"),
)

# The review page's own accounts (grok_pacs.review.accounts; migration 0005): a password hash from a standard
# KDF (scrypt, as werkzeug.security writes it), never the password; role "reviewer" or "administrator".
reviewers = Table(
    "reviewers",
    metadata,
    Column("username", Text, primary_key=True),
    Column("password_hash", Text, nullable=False),
    Column("role", Text, nullable=False),
    Column("display_name", Text, nullable=False, server_default=""),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # the driver's own BEGIN handling off: `_sqlite_begin` emits ours
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('sqlite_begin', 'IMMEDIATE')}")


def open_engine(target: str | Path) -> Engine:
    """An engine for a database URL, or for an SQLite file path (the embedded index)."""
    url = target if isinstance(target, str) and "://" in target else sqlite_url(Path(target))
    if url.startswith("sqlite"):
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # hide_parameters: an error's text (logged, or a study's reason) never carries the row's values
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000}, hide_parameters=True)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if url.startswith("postgresql"):
        # A database host that is unreachable (not refusing) must fail a C-STORE within the sender's DIMSE
        # timeout, not after the OS's TCP timeout; a URL's own ?connect_timeout= wins.
        connect = {} if "connect_timeout=" in url else {"connect_timeout": PG_CONNECT_TIMEOUT_S}
        return create_engine(
            url, connect_args=connect, pool_pre_ping=True, pool_size=10, max_overflow=20, hide_parameters=True
        )
    raise ValueError(f"database_url: {url.split('://')[0]!r} is not supported (sqlite or postgresql+psycopg)")


def is_sqlite(engine: Engine | Connection) -> bool:
    return engine.dialect.name == "sqlite"


@contextmanager
def transaction(engine: Engine, *, write: bool = True) -> Iterator[Connection]:
    """One transaction, committed when the block ends, rolled back when it raises."""
    with engine.connect() as conn:
        if is_sqlite(engine):
            conn.execution_options(sqlite_begin="IMMEDIATE" if write else "DEFERRED")
        elif not write:
            conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            yield conn


def _server_now() -> ColumnElement[float]:
    return func.extract("epoch", func.now()).cast(Double)


def now(conn: Engine | Connection) -> ColumnElement[float]:
    """The current UNIX time as a SQL expression: the server's clock on PostgreSQL, this host's on SQLite."""
    return literal(time.time(), Double) if is_sqlite(conn) else _server_now()


def clock(conn: Engine | Connection) -> ColumnElement[float]:
    """`now` for a statement built once and run many times: on SQLite the bound parameter `now`, which each
    execution passes (time.time()); PostgreSQL ignores it and reads its own clock."""
    return bindparam("now", type_=Double) if is_sqlite(conn) else _server_now()


def received_here(conn: Engine | Connection, node_id: str) -> ColumnElement[bool]:
    """The instances whose file is on this node's disk: every row of the embedded SQLite file (one host
    owns it, whatever its name is today), the rows this node received on a server database shared by
    several listeners (another listener's file is not missing here, it was never here)."""
    return true() if is_sqlite(conn) else instances.c.received_by == node_id


def least(conn: Engine | Connection, a: Any, b: Any) -> ColumnElement[Any]:
    return func.min(a, b) if is_sqlite(conn) else func.least(a, b)


def greatest(conn: Engine | Connection, a: Any, b: Any) -> ColumnElement[Any]:
    return func.max(a, b) if is_sqlite(conn) else func.greatest(a, b)


def insert(conn: Engine | Connection, table: Table) -> Any:
    """The dialect's INSERT (with ON CONFLICT support) for `table`."""
    if is_sqlite(conn):
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    return dialect_insert(table)


def create_schema(engine: Engine) -> None:
    """Create missing tables and indexes, and add columns a file from an older release lacks (all have
    defaults). The embedded SQLite upgrades itself this way: one process owns it."""
    metadata.create_all(engine)
    for table in metadata.sorted_tables:
        present = {column["name"] for column in inspect(engine).get_columns(table.name)}
        for column in table.columns:
            if column.name not in present:
                _add_column(engine, table, column)
        for index in table.indexes:  # create_all makes a missing table's indexes, not a new index's
            index.create(engine, checkfirst=True)


def _add_column(engine: Engine, table: Table, column: Column) -> None:
    spec = column.type.compile(engine.dialect)
    if column.server_default is not None:
        spec += f" NOT NULL DEFAULT '{column.server_default.arg}'"  # type: ignore[attr-defined]
    try:
        with transaction(engine) as conn:
            conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {spec}")
    except DatabaseError as exc:  # another process added it between our two looks
        if "duplicate column" not in str(exc) and "already exists" not in str(exc):
            raise
