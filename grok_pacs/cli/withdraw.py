"""`grok-pacs withdraw STUDY_UID --reason quality|safety`: an administrator withdraws a study's AI results
from the PACS with an IOCM rejection note (registered by grok_pacs.cli.main; the work is
grok_pacs.jobs.withdrawal.withdraw_study)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grok_pacs.cli.main import EXIT_FAILED, EXIT_OK, EXIT_USAGE, settings_from_args
from grok_pacs.cli.options import add_data_dir

DESCRIPTION = (
    "Withdraw a study's AI results from the PACS: queue one IHE IOCM rejection note (a DICOM Key Object "
    "Selection Document titled 'Rejected for Quality Reasons' (113001) or 'Rejected for Patient Safety "
    "Reasons' (113037)) that references the study's current AI SRs and PDF report, mark them WITHDRAWN "
    "in the results register, and write a DICOM audit event. The note is delivered to the destination "
    "exactly once, like the SRs, by the running worker (`grok-pacs serve` or `grok-pacs worker`; a worker "
    "that is not running delivers it when it starts). A PACS that implements IOCM hides the referenced "
    "results; others keep the note beside them. Refuses (exit 1) when the study has no result to withdraw."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "withdraw",
        help="withdraw a study's AI results from the PACS (IOCM rejection note)",
        description=DESCRIPTION,
    )
    parser.add_argument("study_uid", metavar="STUDY_UID", help="Study Instance UID whose results to withdraw")
    parser.add_argument(
        "--reason",
        required=True,
        choices=("quality", "safety"),
        help="quality: the results are wrong or made from a bad or incomplete study (113001); "
        "safety: they could harm a patient (113037)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="TOML settings file (as `grok-pacs --config`)",
    )
    add_data_dir(parser)
    parser.set_defaults(func=run_withdraw)


def run_withdraw(args: argparse.Namespace) -> int:
    from grok_pacs.dicom.uids import require_uid
    from grok_pacs.jobs.publisher import JobPublisher
    from grok_pacs.jobs.withdrawal import NothingToWithdrawError, withdraw_study
    from grok_pacs.ops import audit
    from grok_pacs.store.index import StudyIndex
    from grok_pacs.store.outbox import Outbox
    from grok_pacs.store.storage import open_blob_store

    settings = settings_from_args(args, data_dir=args.data_dir)
    try:
        study_uid = require_uid(args.study_uid, "STUDY_UID")
    except ValueError as exc:
        print(f"grok-pacs withdraw: {exc}", file=sys.stderr)
        return EXIT_USAGE
    audit.configure(settings)
    index = StudyIndex(settings.resolved_database_url, node_id=settings.node_id)
    outbox = Outbox(index.engine)
    store = open_blob_store(settings) if settings.storage_url is not None else None
    publisher = JobPublisher(settings)
    try:
        done = withdraw_study(
            settings, index, outbox, study_uid, args.reason, store=store, publish=publisher.publish_delivery
        )
    except NothingToWithdrawError as exc:
        print(f"grok-pacs withdraw: nothing withdrawn: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        publisher.close()
        if store is not None:
            store.close()
        outbox.close()
        index.close()
    for record in done.records:
        version = record.study_version
        print(f"withdrawn: SR {record.sr_uid} (eye {record.eye}, study version {version}, was {record.state})")
    pdfs = sorted({r.pdf_uid for r in done.records if r.pdf_uid})
    for pdf in pdfs:
        print(f"withdrawn: PDF report {pdf}")
    print(
        f"rejection note {done.rejection_uid} ({done.reason}) queued for {settings.destination or 'no destination'}; "
        "the worker delivers it once"
    )
    if done.published:
        print(
            f"grok-pacs withdraw: its delivery job was not published ({done.published}); "
            "a worker delivers it when it starts, or the reaper within reaper_lease_s",
            file=sys.stderr,
        )
    return EXIT_OK
