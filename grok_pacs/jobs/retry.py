"""Retrying a job through a transient outage: the database, the broker or the object store down for a while.

A PostgreSQL restart or failover takes seconds to minutes, so a few quick retries are not enough: a job
that raises one of `TRANSIENT_ERRORS` is retried by Celery (same task id, new message) with exponential
backoff, `retry_base_s` doubled per retry and capped at `retry_cap_s`, with "equal jitter" (each wait
between half and all of its nominal value, so many workers hit by one outage do not retry in step), as many
times as the nominal waits fit into `retry_max_seconds`. After that the job gives up and says so; its study
or result keeps its state and the reaper (grok_pacs.ingest.reaper) publishes it again once its lease has
expired, so a longer outage still strands nothing.
"""

from __future__ import annotations

import logging
import random
from typing import NoReturn

from celery import Task
from kombu.exceptions import OperationalError as BrokerError

from grok_pacs.config import Settings
from grok_pacs.store import db
from grok_pacs.store.blobs import BlobStoreUnavailable
from grok_pacs.store.files import DiskFullError

log = logging.getLogger("grok_pacs.jobs.retry")


class InstanceReuploading(BlobStoreUnavailable):
    """An instance's object was missing or corrupt: its listener is putting it into the store again."""


# The database down, restarting or locked beyond the busy timeout; the broker unreachable (publishing a
# follow-up message); the object store down, or an instance on its way into it again; the data
# directory full while the results are written (space comes back: retention, an operator).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    db.TransientDatabaseError,
    BrokerError,
    BlobStoreUnavailable,
    DiskFullError,
)


def nominal_wait_s(settings: Settings, retries_done: int) -> float:
    """The wait before retry `retries_done + 1`, without jitter."""
    return min(settings.retry_cap_s, settings.retry_base_s * 2 ** min(retries_done, 62))


def max_retries(settings: Settings) -> int:
    """How many retries' nominal waits fit into `retry_max_seconds` (0 when it is 0)."""
    total, count = 0.0, 0
    while total + nominal_wait_s(settings, count) <= settings.retry_max_seconds:
        total += nominal_wait_s(settings, count)
        count += 1
    return count


def wait_s(settings: Settings, retries_done: int) -> float:
    """The jittered wait before the next retry: between half and all of the nominal one."""
    nominal = nominal_wait_s(settings, retries_done)
    return nominal / 2 + random.uniform(0, nominal / 2)  # noqa: S311 - spreading retries, not a secret


def retry_transient(task: Task, settings: Settings, exc: BaseException, what: str) -> NoReturn:
    """Called by a task on a transient error: raises Celery's Retry with the next wait, or `exc` itself when
    the retries are spent (the job ends; the reaper publishes it again after its lease). Called directly
    (tests), Celery raises `exc`; a broker that takes no retry message raises Reject: the reaper's case too."""
    done, limit = task.request.retries, max_retries(settings)
    if done >= limit:
        log.error(
            "%s: %s after %d retries (%.0f s budget): giving up; the reaper queues it again after its lease",
            what,
            type(exc).__name__,
            done,
            settings.retry_max_seconds,
        )
        raise exc
    countdown = wait_s(settings, done)
    log.warning("%s: transient %s, retry %d/%d in %.1f s", what, type(exc).__name__, done + 1, limit, countdown)
    raise task.retry(exc=exc, countdown=countdown, max_retries=limit)
