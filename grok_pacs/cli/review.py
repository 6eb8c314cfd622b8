"""`grok-pacs review` (the clinicians' review page on its own) and `grok-pacs reviewer add` (an account), registered
by grok_pacs.cli.main. `grok-pacs serve` also serves the page when review_port is set."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from grok_pacs.cli.main import EXIT_FAILED, EXIT_OK, EXIT_USAGE, settings_from_args
from grok_pacs.cli.options import add_data_dir


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "review",
        help="serve the clinicians' review page (worklist, accept / reject / correct)",
        description="Serve the review page on review_bind_address:review_port (waitress) against the database "
        "and data directory of the service, without the listener and worker: its verified SRs and rejection "
        "notes are queued in the outbox and their delivery jobs published to the broker, for the workers "
        "to send. SIGTERM/SIGINT stop it.",
    )
    parser.add_argument("--port", type=int, default=None, help="HTTP port (overrides GROK_PACS_REVIEW_PORT)")
    parser.add_argument("--broker-url", help="broker of the workers (default: embedded SQLite under the data dir)")
    add_data_dir(parser)
    parser.set_defaults(func=run_review)

    accounts = subparsers.add_parser("reviewer", help="manage the review page's accounts")
    commands = accounts.add_subparsers(dest="reviewer_command", metavar="COMMAND", required=True)
    add = commands.add_parser(
        "add",
        help="add an account, or set an existing one's password and role",
        description="Add a review page account (password hashed with scrypt). The password is asked for "
        "twice, or read from --password-file (its first line).",
    )
    add.add_argument("name", help="user name (letters, digits, '.', '_', '@', '-')")
    add.add_argument("--role", required=True, choices=["reviewer", "administrator", "viewer"])
    add.add_argument("--display-name", default="", help="name shown as the verifying clinician (default: NAME)")
    add.add_argument("--password-file", type=Path, help="file whose first line is the password")
    add_data_dir(add)
    add.set_defaults(func=run_reviewer_add)


def run_review(args: argparse.Namespace) -> int:
    from grok_pacs.jobs.publisher import JobPublisher
    from grok_pacs.ops import audit
    from grok_pacs.review.server import ReviewServer

    settings = settings_from_args(
        args, review_port=args.port, broker_url=args.broker_url, data_dir=getattr(args, "data_dir", None)
    )
    audit.configure(settings)
    publisher = JobPublisher(settings)
    try:
        ReviewServer(settings, lambda uid: publisher.publish_delivery(uid, 0)).run()
    finally:
        publisher.close()
    return EXIT_OK


def run_reviewer_add(args: argparse.Namespace) -> int:
    from grok_pacs.review.accounts import AccountError, Accounts, Role

    settings = settings_from_args(args, data_dir=args.data_dir)
    password = _password(args.password_file)
    if password is None:
        return EXIT_USAGE
    accounts = Accounts(settings.resolved_database_url)
    try:
        accounts.set(args.name, password, Role(args.role), args.display_name)
    except AccountError as exc:
        print(f"grok-pacs: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        accounts.close()
    print(f"reviewer {args.name}: role {args.role}")
    return EXIT_OK


def _password(path: Path | None) -> str | None:
    if path is not None:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            print(f"grok-pacs: --password-file {path}: {exc.strerror}", file=sys.stderr)
            return None
        return lines[0] if lines else ""
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        print("grok-pacs: the two passwords differ", file=sys.stderr)
        return None
    return first
