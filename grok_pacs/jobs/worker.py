"""A worker process: one Celery worker per GPU (solo pool) serving analyse and delivery jobs.

Its resources (settings, index, outbox, the engine) are a `WorkerContext` carried by its Celery app;
tasks reach them through their base class (`ContextTask.ctx`), never through a module global.

The model bundle is loaded lazily, once per process, by the first job that needs it: Celery kills
`worker_process_init` handlers after 4 s, and CUDA cannot be re-initialised in a forked child, so a
solo pool (jobs run in the worker's main process) with a lazy load is the one safe arrangement.
SIGTERM is Celery's warm shutdown: the current job finishes (and is acknowledged) before the process
exits; a job interrupted harder (SIGKILL, power loss) is unacknowledged and the broker redelivers it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from celery.signals import worker_ready

from grok_pacs.config import Settings, SettingsError
from grok_pacs.delivery.sender import claim_lease_s
from grok_pacs.jobs.app import TASK_DELIVER_SR, TASK_MODULES, create_app
from grok_pacs.ops import audit, health, metrics, observability
from grok_pacs.report import dispositions
from grok_pacs.store.index import StudyIndex
from grok_pacs.store.outbox import Outbox
from grok_pacs.store.storage import open_blob_store
from grok_pacs.store.uploads import Uploads

if TYPE_CHECKING:  # the engine (torch) is imported only by the worker that loads it
    from grok_pacs.analysis.engine import Engine

log = logging.getLogger("grok_pacs.jobs.worker")


class WorkerContext:
    """Per-process state of a worker: settings, index, outbox, and the engine (loaded on first use)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        try:  # a broken site disposition table stops the worker at start, not every study later
            dispositions.load_table(settings.disposition_table)
        except dispositions.DispositionTableError as exc:
            raise SettingsError(f"disposition_table: {exc}") from exc
        self.index = StudyIndex(settings.resolved_database_url)
        self.outbox = Outbox(self.index.engine)  # one connection pool per process
        # With an object store, instances are fetched from it (grok_pacs.jobs.fetch), never from the
        # listener's disk.
        self.uploads = Uploads(self.index.engine) if settings.storage_url is not None else None
        self.blobs = open_blob_store(settings) if settings.storage_url is not None else None
        self._engine: Engine | None = None
        self._bundle_version: str | None = None
        self._engine_lock = threading.Lock()

    def bundle_version(self) -> str:
        """The served bundle's version, from its manifest (no hashing, no model load)."""
        if self._bundle_version is None:
            from grok_pacs.analysis.bundle import load_bundle

            if self.settings.bundle is None:
                raise SettingsError("bundle: no model bundle configured for this worker")
            self._bundle_version = load_bundle(self.settings.bundle, verify=False).version
        return self._bundle_version

    @property
    def engine_loaded(self) -> bool:
        return self._engine is not None

    def engine(self) -> Engine:
        """The bundle's engine; the first call loads it (seconds to minutes), later calls reuse it."""
        if self._engine is None:
            with self._engine_lock:
                if self._engine is None:
                    from grok_pacs.analysis.engine import Engine  # heavy import (torch): only in workers

                    if self.settings.bundle is None:
                        raise SettingsError("bundle: no model bundle configured for this worker")
                    log.info("loading model bundle %s (pid %d)", self.settings.bundle, os.getpid())
                    started = time.perf_counter()
                    try:
                        self._engine = Engine.from_bundle(
                            Path(self.settings.bundle),
                            min_label_probability=self.settings.min_label_probability,
                            llm_precision=self.settings.llm_precision,
                        )
                    except Exception as exc:  # noqa: BLE001 - recorded for /health, then raised unchanged
                        health.BUNDLE_STATE.mark_failed(f"{type(exc).__name__}: {exc}")
                        raise
                    metrics.model_loaded(
                        "bundle",
                        time.perf_counter() - started,
                        bundle=self.settings.bundle,
                        version=str(self._engine.bundle.version),
                    )
        return self._engine


APP_ATTRIBUTE = "grok_context"  # the app attribute holding its WorkerContext


def configure(app: Celery, settings: Settings) -> WorkerContext:
    """Give `app` a fresh worker context for `settings`; its tasks reach it as `self.ctx`."""
    context = WorkerContext(settings)
    setattr(app, APP_ATTRIBUTE, context)
    return context


def context_of(app: Celery) -> WorkerContext:
    """The worker context of `app`; raises when the app was not configured as a grok-pacs worker."""
    context = getattr(app, APP_ATTRIBUTE, None)
    if context is None:
        raise RuntimeError(
            f"Celery app {app.main!r} has no grok-pacs worker context: "
            "build it with grok_pacs.jobs.worker.worker_app(settings)"
        )
    return context


class ContextTask(Task):
    """Base of the worker's tasks: their resources come from the app that runs them."""

    @property
    def ctx(self) -> WorkerContext:
        return context_of(self.app)


def worker_app(settings: Settings) -> Celery:
    """A Celery app for a worker: the task modules included, its context attached, set as current (the
    tasks' follow-up messages, e.g. delivery retries, go to its broker)."""
    app = create_app(settings, include=TASK_MODULES)
    configure(app, settings)
    app.set_current()
    app.set_default()
    return app


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """A worker consumes: say so, and queue a delivery for every SR a previous run left undelivered."""
    app = getattr(sender, "app", None)
    if app is None or getattr(app, APP_ATTRIBUTE, None) is None:
        return  # a worker of another Celery app in this process: not ours
    ctx = context_of(app)
    log.info(
        "worker ready: pid=%d queue=%s broker=%s bundle=%s",
        os.getpid(),
        ctx.settings.queue,
        ctx.settings.resolved_broker_url.split("://", 1)[0],
        ctx.settings.bundle,
    )
    if ctx.settings.destination is None:
        return
    entries = ctx.outbox.undelivered(lease_s=claim_lease_s(ctx.settings))
    for entry in entries:
        app.send_task(TASK_DELIVER_SR, kwargs={"sr_uid": entry.sr_uid}, queue=ctx.settings.queue)
    if entries:
        log.info("queued %d undelivered SR(s) from the outbox", len(entries))


def node_name(settings: Settings) -> str:
    """A node name unique per process, so several workers on one host never collide."""
    return f"grok-{settings.queue}@{socket.gethostname()}.{os.getpid()}"


def build_worker(app: Celery, settings: Settings, loglevel: str = "INFO") -> Any:
    """A solo-pool Celery worker consuming `settings.queue` (one job at a time), its ready handler
    connected (once per process; it serves whichever configured app's worker becomes ready)."""
    context_of(app)  # fail now, not in the first job, when the app has no context
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # one INFO line per copied module otherwise
    import grok_pacs.analysis.engine  # noqa: F401 - torch/transformers imported now, not inside the first job

    worker_ready.connect(_on_worker_ready, weak=False, dispatch_uid="grok_pacs.jobs.worker.ready")
    return app.Worker(
        pool="solo",
        concurrency=1,
        queues=[settings.queue],
        hostname=node_name(settings),
        loglevel=loglevel,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        optimization="fair",
    )


def run_worker(settings: Settings, loglevel: str = "INFO") -> int:
    """Run a worker in this process until SIGTERM/SIGINT (warm shutdown); returns its exit code."""
    if settings.bundle is None or not Path(settings.bundle).is_dir():
        raise SettingsError(f"bundle: model bundle directory {settings.bundle} does not exist")
    app = worker_app(settings)
    worker = build_worker(app, settings, loglevel)
    server = observability.maybe_start_server(settings, "worker")  # /metrics, /health when metrics_port
    audit.configure(settings)
    audit.application_started("worker")
    try:
        worker.start()
    finally:
        audit.application_stopped("worker")
        if server is not None:
            server.close()
    return int(worker.exitcode or 0)
