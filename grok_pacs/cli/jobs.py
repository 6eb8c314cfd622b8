"""Job subcommands: `serve` (everything on one box) and `worker` (one per GPU), registered by
grok_pacs.cli.main. The work itself is in grok_pacs.jobs (imported when a command runs: torch and Celery
load only then, so `grok-pacs --help` stays fast)."""

from __future__ import annotations

import argparse
from pathlib import Path

from grok_pacs.cli.main import settings_from_args
from grok_pacs.cli.options import add_data_dir, add_listener_options, listener_overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_serve(subparsers)
    _register_worker(subparsers)


def _loglevel(args: argparse.Namespace) -> str:
    return str(getattr(args, "log_level", "INFO")).upper()


def _register_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run everything on one box: listener, assembly and an embedded worker",
        description="Receive studies by C-STORE, analyse each with the model bundle once it is complete, "
        "and deliver the SR to the destination PACS: listener, assembly and one worker in one "
        "process, on the embedded broker (SQLite under the data directory) unless --broker-url "
        "is given. SIGTERM/SIGINT finish the current job, then stop.",
    )
    add_listener_options(parser)
    parser.add_argument("--bundle", type=Path, help="model bundle directory")
    parser.add_argument("--destination", help="PACS receiving the SRs, AE@HOST:PORT")
    parser.add_argument("--broker-url", help="external broker (default: embedded SQLite broker)")
    parser.add_argument("--queue", help="queue name (default grok)")
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from grok_pacs.jobs.serve import run_serve as serve

    settings = settings_from_args(
        args,
        **listener_overrides(args),
        bundle=args.bundle,
        destination=args.destination,
        broker_url=args.broker_url,
        queue=args.queue,
    )
    return serve(settings, _loglevel(args))


def _register_worker(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="run one analysis worker (one per GPU) against a broker",
        description="Run a Celery worker (solo pool: one process, one job at a time; start one per GPU) that "
        "analyses queued studies with the model bundle, writes the SRs and delivers them. The "
        "data directory (index, incoming/, sr/) must be the listener's (same host or shared "
        "volume). SIGTERM finishes the current job, then exits.",
    )
    parser.add_argument("--broker-url", help="broker URL, e.g. redis://host:6379/0 (default: embedded SQLite)")
    parser.add_argument("--queue", help="queue to consume; name it per GPU type (e.g. grok-h100)")
    parser.add_argument("--bundle", type=Path, help="model bundle directory")
    add_data_dir(parser, "data directory shared with the listener")
    parser.add_argument("--destination", help="PACS receiving the SRs, AE@HOST:PORT")
    parser.set_defaults(func=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    from grok_pacs.jobs.worker import run_worker as work

    settings = settings_from_args(
        args,
        broker_url=args.broker_url,
        queue=args.queue,
        bundle=args.bundle,
        data_dir=args.data_dir,
        destination=args.destination,
    )
    return work(settings, _loglevel(args))
