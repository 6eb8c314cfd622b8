"""The Celery application: broker, serialisation and reliability settings for analyse jobs.

JSON only (no pickle); a job is acknowledged only after it finished (`task_acks_late`) and is put back
when its worker process dies (`task_reject_on_worker_lost`); each worker takes one job at a time
(`worker_prefetch_multiplier=1`: jobs are long and GPU-bound). Redis/SQS redeliver an unacknowledged
job after `visibility_timeout`, which is therefore set above the longest job (`job_time_limit`).

The embedded default broker is kombu's SQLAlchemy transport on SQLite under the data directory: a
durable file, no server, and it works with Celery for publishing and consuming (tests run a real
worker on it). That transport passes its transport options to `sqlalchemy.create_engine`, so it gets
the SQLite busy timeout there instead of a visibility timeout (it has none: a message taken by a worker
that is killed outright is not redelivered; a worker's child dying is handled by
`task_reject_on_worker_lost`).

This module only configures an app: no signal handlers, no worker resources. A worker's app carries its
`WorkerContext` and connects its `worker_ready` handler when the worker is built (`grok_pacs.jobs.worker`).
Tasks live in `grok_pacs.jobs.tasks`.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from grok_pacs.config import Settings, broker_ssl_options  # noqa: F401 - re-exported

# Wire names: queued jobs outlive upgrades, so they never follow the module that defines the task.
TASK_ANALYZE_STUDY = "grok_pacs.tasks.analyze_study"
TASK_DELIVER_SR = "grok_pacs.tasks.deliver_sr"
TASK_MODULES = ("grok_pacs.jobs.tasks",)  # what a worker's app includes
VISIBILITY_MARGIN_S = 600.0  # redelivery only this long after a job could at most have finished
SQLITE_BUSY_TIMEOUT_S = 30


def broker_scheme(url: str) -> str:
    """The transport part of a broker URL (`sqla+sqlite:///...` -> `sqla`)."""
    return url.split("://", 1)[0].split("+", 1)[0].lower()


def visibility_timeout_s(settings: Settings) -> int:
    """Redelivery delay of an unacknowledged job: above the longest job, by a margin that scales with it
    (at most VISIBILITY_MARGIN_S), so a short `job_time_limit` also means a quick redelivery."""
    return int(settings.job_time_limit + min(VISIBILITY_MARGIN_S, settings.job_time_limit))


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Transport options for the configured broker (they differ by transport, see module doc)."""
    scheme = broker_scheme(settings.resolved_broker_url)
    if scheme in ("sqla", "sqlalchemy"):
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    options: dict[str, Any] = {
        "visibility_timeout": visibility_timeout_s(settings),
        # Sweep for unacknowledged jobs of dead workers every `interval` s (kombu's default is ~100 s).
        "unacked_restore_interval": max(1, min(10, visibility_timeout_s(settings) // 10)),
        "unacked_restore_throttle": 1,
    }
    if scheme in ("amqp", "amqps", "pyamqp"):
        options = {"confirm_publish": True}  # RabbitMQ acks the publish; no visibility timeout there
    return options


def create_app(settings: Settings, include: tuple[str, ...] = ()) -> Celery:
    """A Celery app for `settings`; `include` names task modules a worker imports (e.g. grok_pacs.jobs.tasks)."""
    if broker_scheme(settings.resolved_broker_url) in ("sqla", "sqlalchemy"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not the dir
    app = Celery("grok_pacs", broker=settings.resolved_broker_url, include=list(include), set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue,
        task_time_limit=settings.job_time_limit,
        broker_transport_options=broker_transport_options(settings),
        broker_use_ssl=broker_ssl_options(settings) or False,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
    )
    return app
