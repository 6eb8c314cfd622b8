"""`grok-pacs serve`: the whole service on one box in one command — listener, assembly and an embedded
worker, on the embedded default broker (SQLite under the data directory) unless a broker URL is given.

The worker runs in this process's main thread (solo pool; Celery owns SIGTERM/SIGINT: warm shutdown, the
current job finishes), the listener and assembly in background threads. The embedded broker does not
redeliver a job whose worker was killed outright, so at start every study left QUEUED, ANALYSING or
DELIVERING by the previous run is queued again (jobs are idempotent: a duplicate does nothing) and the
worker queues every undelivered SR of the outbox.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from grok_pacs.jobs.app import broker_scheme
from grok_pacs.config import Settings, SettingsError
from grok_pacs.store.index import StudyIndex, StudyState

log = logging.getLogger("grok_pacs.jobs.serve")

UNFINISHED = (StudyState.QUEUED, StudyState.ANALYSING, StudyState.DELIVERING)
EMBEDDED_SCHEMES = ("sqla", "sqlalchemy")


def requeue_unfinished(index: StudyIndex, publisher) -> list[tuple[str, int]]:
    """Publish the job of every study a previous run left unfinished; returns [(study, version)]."""
    requeued = []
    for study in index.studies():
        if study.state in UNFINISHED and study.version > 0:
            publisher.publish(study.study_uid, study.version)
            requeued.append((study.study_uid, study.version))
    if requeued:
        log.info("requeued %d unfinished studies from the previous run", len(requeued))
    return requeued


def run_serve(settings: Settings, loglevel: str = "INFO") -> int:
    """Listener + assembly + embedded worker until SIGTERM/SIGINT; returns the exit status."""
    from grok_pacs.ops import metrics
    from grok_pacs.jobs import worker
    from grok_pacs.jobs.app import create_app
    from grok_pacs.ingest.service import IngestService

    if settings.bundle is None or not Path(settings.bundle).is_dir():
        raise SettingsError(f"bundle: model bundle directory {settings.bundle} does not exist")
    worker.configure(settings)
    app = create_app(settings, include=worker.TASK_MODULES)
    app.set_current()
    app.set_default()
    service = IngestService(settings)
    if broker_scheme(settings.resolved_broker_url) in EMBEDDED_SCHEMES:
        requeue_unfinished(service.index, service.publisher)
    observability = metrics.maybe_start_server(settings, "serve")  # /metrics, /health when metrics_port
    metrics.watch_studies(service.index.count_by_state)
    service.start()
    log.info("serving: ae=%s port=%d data_dir=%s broker=%s queue=%s destination=%s", settings.ae_title,
             service.port, settings.data_dir, broker_scheme(settings.resolved_broker_url), settings.queue,
             settings.destination or "-")
    try:
        celery_worker = worker.build_worker(app, settings, loglevel)
        celery_worker.start()  # blocks; returns after a warm shutdown
        return int(celery_worker.exitcode or 0)
    finally:
        log.info("stopping listener and assembly")
        if observability is not None:
            observability.close()
        metrics.watch_studies(None)
        service.stop()


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register `grok-pacs serve` (see grok_pacs.cli.main)."""
    parser = subparsers.add_parser(
        "serve", help="run everything on one box: listener, assembly and an embedded worker",
        description="Receive studies by C-STORE, analyse each with the model bundle once it is complete, "
                    "and deliver the SR to the destination PACS: listener, assembly and one worker in one "
                    "process, on the embedded broker (SQLite under the data directory) unless --broker-url "
                    "is given. SIGTERM/SIGINT finish the current job, then stop.",
    )
    parser.add_argument("--port", type=int, help="DICOM port (overrides GROK_PACS_PORT)")
    parser.add_argument("--ae-title", help="our AE title (overrides GROK_PACS_AE_TITLE)")
    parser.add_argument("--bind", help="bind address (overrides GROK_PACS_BIND_ADDRESS)")
    parser.add_argument("--data-dir", type=Path, help="data directory")
    parser.add_argument("--bundle", type=Path, help="model bundle directory")
    parser.add_argument("--destination", help="PACS receiving the SRs, AE@HOST:PORT")
    parser.add_argument("--broker-url", help="external broker (default: embedded SQLite broker)")
    parser.add_argument("--queue", help="queue name (default grok)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from grok_pacs.cli.main import settings_from_args

    settings = settings_from_args(args, port=args.port, ae_title=args.ae_title, bind_address=args.bind,
                                  data_dir=args.data_dir, bundle=args.bundle, destination=args.destination,
                                  broker_url=args.broker_url, queue=args.queue)
    return run_serve(settings, str(getattr(args, "log_level", "INFO")).upper())
