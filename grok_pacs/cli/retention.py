"""`grok-pacs purge`: one retention pass now (registered by grok_pacs.cli.main); the listener runs the same
pass every retention_interval_s (grok_pacs.store.retention)."""

from __future__ import annotations

import argparse

from grok_pacs.cli.main import EXIT_OK, settings_from_args
from grok_pacs.cli.options import add_data_dir

DESCRIPTION = (
    "Remove what retention no longer keeps, and print it (study UIDs, counts and bytes; no patient data). "
    "Only delivered studies are purged (state DONE and every result DELIVERED): never one still receiving, "
    "queued, analysing, delivering, failed, or kept because no destination is configured. "
    "retention_days (GROK_PACS_RETENTION_DAYS, default 30; 0 = forever) after delivery, a study's received "
    "instances (incoming/ files of this node, their objects in the object store) and its result files and "
    "objects go, and its instance rows; its study row stays, saying so. retention_rows_days (default 0 = "
    "forever; else at least retention_days) after delivery, its study and outbox rows go too. Files left "
    "in tmp/ and scratch/ older than retention_scratch_hours (default 24) go. Run it on each listener host "
    "(each removes its own files); a running listener does the same every retention_interval_s."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "purge", help="apply the retention policy now (--dry-run: only show it)", description=DESCRIPTION
    )
    parser.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    add_data_dir(parser)
    parser.set_defaults(func=run_purge)


def run_purge(args: argparse.Namespace) -> int:
    from grok_pacs.store.index import StudyIndex
    from grok_pacs.store.retention import Retention
    from grok_pacs.store.storage import open_blob_store

    settings = settings_from_args(args, data_dir=args.data_dir)
    index = StudyIndex(settings.resolved_database_url, node_id=settings.node_id)
    store = open_blob_store(settings) if settings.storage_url is not None else None
    try:
        report = Retention(settings, index.engine, store).run(dry_run=args.dry_run)
    finally:
        if store is not None:
            store.close()
        index.close()
    verb = "would remove" if report.dry_run else "removed"
    for study in report.studies:
        what = f"{study.instances} instances, {study.results} results ({study.objects} objects), {study.bytes} bytes"
        print(f"study {study.study_uid}: {verb} {what}" + (", and its rows" if study.rows else ""))
    print(
        f"{verb}: {len(report.studies)} studies, {report.scratch_files} scratch files, {report.bytes} bytes"
        + (" (object sizes not counted in a dry run)" if report.dry_run and store is not None else "")
    )
    return EXIT_OK
