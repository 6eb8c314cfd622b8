"""`grok-pacs db upgrade` and `grok-pacs db current`: the database schema (grok_pacs.store.schema)."""

from __future__ import annotations

import argparse
import sys

from grok_pacs.cli.main import EXIT_FAILED, EXIT_OK, settings_from_args

_DESCRIPTION = (
    "The index database's schema. With PostgreSQL (GROK_PACS_DATABASE_URL) run `grok-pacs db upgrade` once "
    "per release, from one host, before starting the new release's services (they refuse to start until "
    "the schema is at the revision they need); a second upgrade started meanwhile waits on an advisory "
    "lock and finds nothing left to do. The embedded SQLite file upgrades itself when its one process starts."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("db", help="database schema: upgrade, current", description=_DESCRIPTION)
    actions = parser.add_subparsers(dest="db_action", metavar="ACTION", required=True)
    actions.add_parser("upgrade", help="apply every missing migration").set_defaults(func=run_upgrade)
    actions.add_parser("current", help="print the schema revision and this release's").set_defaults(func=run_current)


def _engine(args: argparse.Namespace):
    from grok_pacs.store import db

    return db.open_engine(settings_from_args(args).resolved_database_url)


def run_upgrade(args: argparse.Namespace) -> int:
    from grok_pacs.store import db, schema

    engine = _engine(args)
    try:
        before, after = schema.upgrade(engine)
    except db.DatabaseError as exc:  # unreachable, refused, no permission: say so (the URL may hold a password)
        print(f"grok-pacs: database upgrade failed: {type(exc).__name__}: {exc.args[0]}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        engine.dispose()
    print(f"database schema: {before or 'empty'} -> {after}" if before != after else f"database schema: {after}")
    return EXIT_OK


def run_current(args: argparse.Namespace) -> int:
    from grok_pacs.store import db, schema

    engine = _engine(args)
    try:
        found, needed = schema.current(engine), schema.head()
    except db.DatabaseError as exc:
        print(f"grok-pacs: cannot read the database: {type(exc).__name__}: {exc.args[0]}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        engine.dispose()
    print(f"database schema: {found or 'empty'}; this release needs {needed}")
    return EXIT_OK if found == needed else EXIT_FAILED
