"""The one-box service (`grok-pacs serve`): the whole service on one box in one command — listener, assembly and an
embedded
worker, on the embedded default broker (SQLite under the data directory) unless a broker URL is given.

The worker runs in this process's main thread (solo pool; Celery owns SIGTERM/SIGINT: warm shutdown, the
current job finishes), the listener and assembly in background threads. The embedded broker does not
redeliver a job whose worker was killed outright, so at start every study left QUEUED, ANALYSING or
DELIVERING by the previous run is queued again (jobs are idempotent: a duplicate does nothing) and the
worker queues every undelivered SR of the outbox. With review_port set, the clinicians' review page
(grok_pacs.review) runs in a background thread too. While it runs, the ingest service's reaper
(grok_pacs.ingest.reaper) does the same for work whose lease expired.
"""

from __future__ import annotations

import logging
from pathlib import Path

from grok_pacs.config import Settings, SettingsError
from grok_pacs.ingest.assembly import Publisher
from grok_pacs.ingest.service import IngestService
from grok_pacs.jobs import worker
from grok_pacs.jobs.app import broker_scheme
from grok_pacs.jobs.publisher import JobPublisher
from grok_pacs.ops import audit, metrics, observability
from grok_pacs.review.server import ReviewServer
from grok_pacs.store.index import StudyIndex, StudyState

log = logging.getLogger("grok_pacs.jobs.serve")

UNFINISHED = (StudyState.QUEUED, StudyState.ANALYSING, StudyState.DELIVERING)
EMBEDDED_SCHEMES = ("sqla", "sqlalchemy")


def requeue_unfinished(index: StudyIndex, publisher: Publisher) -> list[tuple[str, int]]:
    """Publish the job of every study a previous run left unfinished; returns [(study, version)]."""
    requeued = []
    for study in index.studies():
        if study.state in UNFINISHED and study.version > 0:
            publisher.publish(study.study_uid, study.version)
            requeued.append((study.study_uid, study.version))
    if requeued:
        log.info("requeued %d unfinished studies from the previous run", len(requeued))
    return requeued


def _start_review(settings: Settings, publisher: JobPublisher) -> ReviewServer | None:
    """The review page in a background thread when review_port is set; reviews are sent by delivery jobs."""
    if not settings.review_port:
        return None
    return ReviewServer(settings, lambda uid: publisher.publish_delivery(uid, 0)).start()


def run_serve(settings: Settings, loglevel: str = "INFO") -> int:
    """Listener + assembly + embedded worker until SIGTERM/SIGINT; returns the exit status."""
    if settings.bundle is None or not Path(settings.bundle).is_dir():
        raise SettingsError(f"bundle: model bundle directory {settings.bundle} does not exist")
    app = worker.worker_app(settings)
    publisher = JobPublisher(settings)
    service = IngestService(settings, publisher)
    if broker_scheme(settings.resolved_broker_url) in EMBEDDED_SCHEMES:
        requeue_unfinished(service.index, service.publisher)
    server = observability.maybe_start_server(settings, "serve")  # /metrics, /health when metrics_port
    review = _start_review(settings, publisher)  # the clinicians' page when review_port
    metrics.watch_studies(service.index.count_by_state)
    service.start()
    log.info(
        "serving: ae=%s port=%d data_dir=%s broker=%s queue=%s destination=%s",
        settings.ae_title,
        service.port,
        settings.data_dir,
        broker_scheme(settings.resolved_broker_url),
        settings.queue,
        settings.destination or "-",
    )
    try:
        celery_worker = worker.build_worker(app, settings, loglevel)
        audit.application_started("worker")  # the listener's start and stop are audited by the service
        celery_worker.start()  # blocks; returns after a warm shutdown
        return int(celery_worker.exitcode or 0)
    finally:
        audit.application_stopped("worker")
        log.info("stopping listener and assembly")
        if server is not None:
            server.close()
        if review is not None:
            review.stop()
        metrics.watch_studies(None)
        service.stop()
