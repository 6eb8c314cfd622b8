"""`grok-pacs worker`: one Celery worker process per GPU (solo pool) serving analyse and delivery jobs.

The model bundle is loaded lazily, once per process, by the first job that needs it: Celery kills
`worker_process_init` handlers after 4 s, and CUDA cannot be re-initialised in a forked child, so a
solo pool (jobs run in the worker's main process) with a lazy load is the one safe arrangement.
SIGTERM is Celery's warm shutdown: the current job finishes (and is acknowledged) before the process
exits; a job interrupted harder (SIGKILL, power loss) is unacknowledged and the broker redelivers it.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grok_pacs.ops import health
from grok_pacs.ops import metrics
from grok_pacs.config import Settings, SettingsError, load_settings
from grok_pacs.store.index import StudyIndex
from grok_pacs.store.outbox import Outbox

if TYPE_CHECKING:  # celery and the engine are imported by the functions that need them (fast CLI start)
    from celery import Celery

    from grok_pacs.analysis.engine import Engine

log = logging.getLogger("grok_pacs.jobs.worker")

TASK_MODULES = ("grok_pacs.jobs.tasks",)


class WorkerContext:
    """Per-process state of a worker: settings, index, outbox, and the engine (loaded on first use)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.index = StudyIndex(settings.index_path)
        self.outbox = Outbox(settings.index_path)
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

    def engine(self) -> "Engine":
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
                        self._engine = Engine.from_bundle(Path(self.settings.bundle))
                    except Exception as exc:  # noqa: BLE001 - recorded for /health, then raised unchanged
                        health.BUNDLE_STATE.mark_failed(f"{type(exc).__name__}: {exc}")
                        raise
                    metrics.model_loaded("bundle", time.perf_counter() - started, bundle=self.settings.bundle,
                                         version=str(self._engine.bundle.version))
        return self._engine


_context: WorkerContext | None = None
_context_lock = threading.Lock()


def configure(settings: Settings) -> WorkerContext:
    """Install the process's worker context (the CLI does this before the worker starts)."""
    global _context
    with _context_lock:
        _context = WorkerContext(settings)
        return _context


def context() -> WorkerContext:
    """The process's worker context; from `load_settings()` when a worker was started another way."""
    global _context
    if _context is None:
        with _context_lock:
            if _context is None:
                _context = WorkerContext(load_settings())
    return _context


def on_worker_ready() -> None:
    """At start: say so, and queue a delivery for every SR a previous run left undelivered."""
    from grok_pacs.delivery.sender import claim_lease_s
    from grok_pacs.jobs.tasks import deliver_sr

    ctx = context()
    log.info("worker ready: pid=%d queue=%s broker=%s bundle=%s", os.getpid(), ctx.settings.queue,
             ctx.settings.resolved_broker_url.split("://", 1)[0], ctx.settings.bundle)
    if ctx.settings.destination is None:
        return
    entries = ctx.outbox.undelivered(lease_s=claim_lease_s(ctx.settings))
    for entry in entries:
        deliver_sr.apply_async(kwargs={"sr_uid": entry.sr_uid}, queue=ctx.settings.queue)
    if entries:
        log.info("queued %d undelivered SR(s) from the outbox", len(entries))


def node_name(settings: Settings) -> str:
    """A node name unique per process, so several workers on one host never collide."""
    return f"grok-{settings.queue}@{socket.gethostname()}.{os.getpid()}"


def build_worker(app: "Celery", settings: Settings, loglevel: str = "INFO") -> Any:
    """A solo-pool Celery worker consuming `settings.queue` (one job at a time)."""
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # one INFO line per copied module otherwise
    import grok_pacs.analysis.engine  # noqa: F401 - torch/transformers imported now, not inside the first job
    return app.Worker(
        pool="solo", concurrency=1, queues=[settings.queue], hostname=node_name(settings),
        loglevel=loglevel, without_gossip=True, without_mingle=True, without_heartbeat=True,
        optimization="fair",
    )


def run_worker(settings: Settings, loglevel: str = "INFO") -> int:
    """Run a worker in this process until SIGTERM/SIGINT (warm shutdown); returns its exit code."""
    if settings.bundle is None or not Path(settings.bundle).is_dir():
        raise SettingsError(f"bundle: model bundle directory {settings.bundle} does not exist")
    from grok_pacs.jobs.app import create_app

    configure(settings)
    app = create_app(settings, include=TASK_MODULES)
    app.set_current()  # tasks' follow-up messages (delivery retries) go to this app's broker
    app.set_default()
    worker = build_worker(app, settings, loglevel)
    observability = metrics.maybe_start_server(settings, "worker")  # /metrics, /health when metrics_port
    try:
        worker.start()
    finally:
        if observability is not None:
            observability.close()
    return int(worker.exitcode or 0)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register `grok-pacs worker` (see grok_pacs.cli.main)."""
    parser = subparsers.add_parser(
        "worker", help="run one analysis worker (one per GPU) against a broker",
        description="Run a Celery worker (solo pool: one process, one job at a time; start one per GPU) that "
                    "analyses queued studies with the model bundle, writes the SRs and delivers them. The "
                    "data directory (index, incoming/, sr/) must be the listener's (same host or shared "
                    "volume). SIGTERM finishes the current job, then exits.",
    )
    parser.add_argument("--broker-url", help="broker URL, e.g. redis://host:6379/0 (default: embedded SQLite)")
    parser.add_argument("--queue", help="queue to consume; name it per GPU type (e.g. grok-h100)")
    parser.add_argument("--bundle", type=Path, help="model bundle directory")
    parser.add_argument("--data-dir", type=Path, help="data directory shared with the listener")
    parser.add_argument("--destination", help="PACS receiving the SRs, AE@HOST:PORT")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from grok_pacs.cli.main import settings_from_args

    settings = settings_from_args(args, broker_url=args.broker_url, queue=args.queue, bundle=args.bundle,
                                  data_dir=args.data_dir, destination=args.destination)
    return run_worker(settings, str(getattr(args, "log_level", "INFO")).upper())
