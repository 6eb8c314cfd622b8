"""Ingest subcommands: `listen`, `echo`, `send`, `studies` (registered by grok_pacs.cli.main)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import signal
import ssl
import sys
import time
from pathlib import Path

from grok_pacs.cli.main import EXIT_FAILED, EXIT_OK, EXIT_USAGE, settings_from_args
from grok_pacs.cli.options import add_data_dir, add_listener_options, listener_overrides
from grok_pacs.config import Peer, Settings

log = logging.getLogger("grok_pacs.cli.main")


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_listen(subparsers)
    _register_echo(subparsers)
    _register_send(subparsers)
    _register_studies(subparsers)


def _peer(text: str) -> Peer:
    try:
        return Peer.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


# --- listen ------------------------------------------------------------------------------------------
def _register_listen(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "listen",
        help="run the DICOM C-STORE listener and study assembly",
        description="Accept ophthalmic instances (OP, OPT, OCT en face / B-scan volume analysis, "
        "thickness maps) by DICOM C-STORE, store each durably under DATA_DIR/incoming/, index it, and "
        "queue an analyse job once a study has been quiet for quiet_period seconds. On start, files left "
        "by a crash are indexed and temporary files removed. Stops on SIGINT/SIGTERM.",
    )
    add_listener_options(parser)
    parser.set_defaults(func=run_listen)


def run_listen(args: argparse.Namespace) -> int:
    from grok_pacs.ingest.service import IngestService
    from grok_pacs.jobs.publisher import JobPublisher
    from grok_pacs.ops import metrics, observability

    settings = settings_from_args(args, **listener_overrides(args))
    # The handler only flips a flag: a handler that takes a lock (Event.set) can deadlock against the
    # main thread holding that same lock inside Event.wait when the signal lands.
    stopping: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, _frame: stopping.append(signum))
    service = IngestService(settings, JobPublisher(settings))
    server = observability.maybe_start_server(settings, "listener")  # /metrics, /health when metrics_port
    metrics.watch_studies(service.index.count_by_state)
    service.start()
    log.info(
        "ready: data_dir=%s broker=%s queue=%s quiet_period=%.1fs",
        settings.data_dir,
        settings.resolved_broker_url.split("://", 1)[0],
        settings.queue,
        settings.quiet_period,
    )
    while not stopping:
        time.sleep(0.2)
    log.info("stopping")
    if server is not None:
        server.close()
    metrics.watch_studies(None)
    service.stop()
    return EXIT_OK


# --- echo / send -------------------------------------------------------------------------------------
def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--calling-ae", default=None, help="our AE title on this association (default: ae_title from settings)"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the peer (30)")
    parser.add_argument(
        "--tls-ca",
        type=Path,
        default=None,
        metavar="PEM",
        help="use TLS and verify the peer's certificate with this CA bundle; our "
        "tls_certificate/tls_key settings, when set, are presented as client certificate",
    )


def _client_tls(args: argparse.Namespace, settings: Settings) -> ssl.SSLContext | None:
    if args.tls_ca is None:
        return None
    context = ssl.create_default_context(cafile=str(args.tls_ca))
    context.check_hostname = False  # DICOM peers are addressed by IP; the CA decides trust
    if settings.tls_enabled:
        context.load_cert_chain(str(settings.tls_certificate), str(settings.tls_key))
    return context


def _register_echo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "echo",
        help="DICOM C-ECHO a peer (verify connectivity)",
        description="Send a C-ECHO to PEER (AE@HOST:PORT). Without PEER: the destination setting if set, "
        "else our own listener on 127.0.0.1. Exit status 0 when the peer answered Success.",
    )
    parser.add_argument("peer", nargs="?", type=_peer, default=None, metavar="AE@HOST:PORT")
    _add_client_options(parser)
    parser.set_defaults(func=run_echo)


def run_echo(args: argparse.Namespace) -> int:
    from grok_pacs.dicom.scu import StoreError, echo

    settings = settings_from_args(args)
    peer = args.peer or settings.destination or Peer(ae_title=settings.ae_title, host="127.0.0.1", port=settings.port)
    try:
        echo(peer, args.calling_ae or settings.ae_title, timeout=args.timeout, tls=_client_tls(args, settings))
    except StoreError as exc:
        print(f"echo {peer}: FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"echo {peer}: OK")
    return EXIT_OK


def _register_send(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "send",
        help="C-STORE DICOM files to a peer",
        description="Send DICOM FILES (directories are searched recursively) to --to AE@HOST:PORT on one "
        "association, as stored (no recompression). Prints one line per file; exit status 1 if any file "
        "was not stored.",
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILES")
    parser.add_argument("--to", required=True, type=_peer, metavar="AE@HOST:PORT", help="receiving peer")
    _add_client_options(parser)
    parser.set_defaults(func=run_send)


def _expand(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return files


def run_send(args: argparse.Namespace) -> int:
    from grok_pacs.dicom.scu import StoreError, store_files

    settings = settings_from_args(args)
    try:
        files = _expand(args.files)
        results = store_files(
            args.to, files, args.calling_ae or settings.ae_title, timeout=args.timeout, tls=_client_tls(args, settings)
        )
    except (StoreError, FileNotFoundError) as exc:
        print(f"send to {args.to}: FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILED if isinstance(exc, StoreError) else EXIT_USAGE
    for result in results:
        word = "OK" if result.ok else "FAILED"
        print(f"{word:6} {result.status_name:28} {result.path}" + (f"  ({result.message})" if result.message else ""))
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} of {len(results)} stored on {args.to}")
    return EXIT_FAILED if failed else EXIT_OK


# --- studies -----------------------------------------------------------------------------------------
def _register_studies(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "studies",
        help="list received studies and their state",
        description="List the studies in the index (newest first) with state (RECEIVING, QUEUED, "
        "ANALYSING, DELIVERING, DONE, FAILED), queued version, instance count and times.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_data_dir(parser)
    parser.set_defaults(func=run_studies)


def _when(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


def run_studies(args: argparse.Namespace) -> int:
    from grok_pacs.store.index import StudyIndex

    settings = settings_from_args(args, data_dir=args.data_dir)
    studies = []
    if settings.database_url or settings.index_path.is_file():  # never create an empty index here
        index = StudyIndex(settings.resolved_database_url)
        studies = index.studies()
        index.close()
    if args.json:
        rows = [{**s.__dict__, "state": s.state.value} for s in studies]
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not studies:
        print(f"no studies in {settings.database_url and 'the database' or settings.index_path}")
        return EXIT_OK
    width = max(len("STUDY INSTANCE UID"), *(len(s.study_uid) for s in studies))
    print(
        f"{'STUDY INSTANCE UID':{width}}  {'STATE':10}  VER  INST  {'FIRST RECEIVED':19}  {'LAST RECEIVED':19}  DETAIL"
    )
    for s in studies:
        print(
            f"{s.study_uid:{width}}  {s.state.value:10}  {s.version:3}  {s.instance_count:4}  "
            f"{_when(s.first_received_at)}  {_when(s.last_received_at)}  {s.detail}"
        )
    return EXIT_OK
