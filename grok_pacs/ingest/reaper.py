"""The reaper: no study or result stays stranded, whatever the topology.

A job can vanish outside any worker's reach: a broker killed or failed over before its append-only file
reached the disk (Redis' `appendfsync everysec` acknowledges a publish up to a second before it is durable),
a worker host lost with its unacknowledged message on a broker that does not redeliver (the embedded SQLite
broker), or a job whose transient-error retries ran out during a long outage (grok_pacs.jobs.retry). The
reaper runs in every listener (`grok-pacs listen`, and the one-box `grok-pacs serve`), every
`reaper_interval_s`: each study QUEUED, ANALYSING or DELIVERING and each result of a DELIVERING study whose
lease expired without a live worker (grok_pacs.store.leases) gets its job published again. Jobs are
idempotent (deterministic SR UIDs, claims in the database), so a job published twice does its work once.

Each pass also sets `grok_pacs_oldest_unfinished_study_seconds`, which the alert in
deploy/prometheus/alerts.yml watches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from grok_pacs.config import Settings
from grok_pacs.ingest.assembly import Publisher
from grok_pacs.ops import metrics
from grok_pacs.ops.periodic import Periodic
from grok_pacs.store import leases
from grok_pacs.store.index import StudyIndex

log = logging.getLogger("grok_pacs.ingest.reaper")


def lease_s(settings: Settings) -> float:
    """How long unfinished work may go untouched before it is taken back: `reaper_lease_s`, by default the
    longest a live job can hold it (its time limit, plus its transient-error retries)."""
    if settings.reaper_lease_s is not None:
        return settings.reaper_lease_s
    return settings.job_time_limit + settings.retry_max_seconds


@dataclass(frozen=True)
class ReaperPass:
    studies: tuple[leases.Reaped, ...]  #: analyses published again
    results: tuple[leases.Reaped, ...]  #: deliveries published again
    oldest_unfinished_s: float


class Reaper:
    """`run_once()` does one pass; `start()` runs one every `reaper_interval_s` in a daemon thread.

    `publisher.publish(study, version)` queues an analysis; a publisher with `publish_delivery(sr_uid,
    retry_number)` (grok_pacs.jobs.publisher.JobPublisher) also gets lost deliveries queued again.
    """

    def __init__(self, settings: Settings, index: StudyIndex, publisher: Publisher) -> None:
        self.settings = settings
        self.index = index
        self.publisher = publisher
        self._deliver: Callable[[str, int], object] | None = getattr(publisher, "publish_delivery", None)
        self._periodic = Periodic("reaper", self.run_once, settings.reaper_interval_s)

    def run_once(self) -> ReaperPass:
        engine, lease = self.index.engine, lease_s(self.settings)
        studies = leases.requeue_studies(engine, lease, self.publisher.publish)
        results: list[leases.Reaped] = []
        if self._deliver is not None:
            grace = self.settings.delivery_backoff_max_s  # a PENDING result waits this long for its retry
            results = leases.requeue_results(engine, lease, grace, self._deliver)
        for item in studies:
            log.warning(
                "reaper: study %s v%d was %s with no live job for %.0f s: its analysis is queued again",
                item.study_uid,
                item.version,
                item.state,
                lease,
            )
        for item in results:
            log.warning(
                "reaper: result %s of study %s was %s with no live job for %.0f s: its delivery is queued again",
                item.sr_uid,
                item.study_uid,
                item.state,
                lease,
            )
        oldest = leases.oldest_unfinished_s(engine)
        metrics.reaper_pass(oldest, len(studies), len(results))
        return ReaperPass(tuple(studies), tuple(results), oldest)

    def start(self) -> None:
        self._periodic.start()

    def stop(self) -> None:
        self._periodic.stop()
