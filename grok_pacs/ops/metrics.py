"""Prometheus metrics of grok-pacs: the counters, histograms and gauges, and the calls that record them.

Every process (listener, worker, one-box serve) keeps its own counters in `REGISTRY`; `grok_pacs.ops.http`
serves them on `settings.metrics_port` when that is non-zero. Label values come from small fixed sets
(outcomes, stages, SOP class UIDs we accept), never from patients or studies, so the series count stays
bounded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics_core import GaugeMetricFamily

from grok_pacs.ops import health

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

# Job stages (the `stage` label of JOB_SECONDS): queue_wait = study complete (last instance + quiet
# period) to analysis start; analysis = reading pixels, the model and building the SRs (the first job of a
# worker includes loading the bundle); delivery = one SR's C-STORE; total = last instance received to the
# end of the job (SRs delivered or their delivery scheduled), the latency a clinician notices.
STAGES = ("queue_wait", "analysis", "delivery", "total")
# Seconds: a queue wait can be hours on a backlog, inference tens of seconds on a GPU, minutes on CPU.
JOB_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200, 3600, float("inf"))

ASSOCIATIONS = Counter(
    "grok_pacs_associations",
    "DICOM associations requested of the listener, by outcome (accepted or rejected)",
    ["outcome"],
    registry=REGISTRY,
)
CONNECTIONS_DROPPED = Counter(
    "grok_pacs_connections_dropped",
    "Connections the listener closed to protect itself (PDU over the limit, PDU deadline, no association request)",
    ["reason"],
    registry=REGISTRY,
)
INSTANCES_RECEIVED = Counter(
    "grok_pacs_instances_received",
    "Instances stored by the listener (C-STORE answered Success), by SOP class UID",
    ["sop_class"],
    registry=REGISTRY,
)
INSTANCES_FAILED = Counter(
    "grok_pacs_instances_failed",
    "C-STORE requests the listener answered with a failure status, by reason",
    ["reason"],
    registry=REGISTRY,
)
INSTANCES_DUPLICATE = Counter(
    "grok_pacs_instances_duplicate",
    "Instances received again that were already stored (answered Success, not stored twice)",
    registry=REGISTRY,
)
BYTES_RECEIVED = Counter(
    "grok_pacs_received_bytes",
    "Bytes of DICOM instances (file meta included) written by the listener",
    registry=REGISTRY,
)
JOB_SECONDS = Histogram(
    "grok_pacs_job_duration_seconds",
    "Seconds an analysis job spends in each stage (queue_wait, analysis, delivery, total)",
    ["stage"],
    buckets=JOB_BUCKETS,
    registry=REGISTRY,
)
JOBS = Counter(
    "grok_pacs_jobs",
    "Analysis jobs finished by this worker, by outcome (succeeded or failed)",
    ["outcome"],
    registry=REGISTRY,
)
SR_DELIVERED = Counter(
    "grok_pacs_sr_deliveries",
    "Structured Reports accepted by the destination PACS",
    registry=REGISTRY,
)
SR_DELIVERY_FAILURES = Counter(
    "grok_pacs_sr_delivery_failures",
    "Failed SR delivery attempts, by kind (transient: retried later; permanent: given up)",
    ["kind"],
    registry=REGISTRY,
)
MODEL_LOAD_SECONDS = Gauge(
    "grok_pacs_model_load_seconds",
    "Seconds the last load of each model component took",
    ["component"],
    registry=REGISTRY,
)
NARRATIVES = Counter(
    "grok_pacs_narratives",
    "Eyes' findings by the validator's outcome: passed (the first generation), retried (a second attempt "
    "passed, grok_pacs.analysis.rewrite) or failed (every attempt failed: withheld from the SR)",
    ["outcome"],
    registry=REGISTRY,
)
NARRATIVE_FAILURES = Counter(
    "grok_pacs_narrative_failures",
    "Failed generations by reason (grok_pacs.analysis.validation; every attempt counts; one may fail several)",
    ["reason"],
    registry=REGISTRY,
)
GATE_VERDICTS = Counter(
    "grok_pacs_gate_verdicts",
    "Images judged by the gradability gate (grok_pacs.analysis.quality), by modality and outcome",
    ["modality", "gradability"],
    registry=REGISTRY,
)
GATE_REASONS = Counter(
    "grok_pacs_gate_reasons",
    "Reasons the gate gave for images it did not pass (one image may have several)",
    ["reason"],
    registry=REGISTRY,
)
UPLOADS = Counter(
    "grok_pacs_uploads",
    "Instances the uploader put into the object store, by outcome (uploaded; refused: stays LOCAL, counted once,"
    " see the log;"
    " store_down: a pass stopped because the store was unavailable; lost: found missing or corrupt in the store"
    " and gone from this host's disk)",
    ["outcome"],
    registry=REGISTRY,
)
OLDEST_UNFINISHED = Gauge(
    "grok_pacs_oldest_unfinished_study_seconds",
    "Age of the oldest study not DONE or FAILED, since its last instance (database time; 0 when none); set by"
    " the reaper pass of each listener. Growing beyond the longest job means stranded or stalled work",
    registry=REGISTRY,
)
REAPED = Counter(
    "grok_pacs_reaped",
    "Jobs the reaper published again: an analysis (study) or a delivery (result) whose lease had expired",
    ["kind"],
    registry=REGISTRY,
)
PURGED_STUDIES = Counter(
    "grok_pacs_purged_studies",
    "Delivered studies purged by retention, by what went (files: instances and results; rows: index and outbox)",
    ["what"],
    registry=REGISTRY,
)
PURGED_BYTES = Counter(
    "grok_pacs_purged_bytes",
    "Bytes freed by retention (instance and result files, objects, leftover scratch files)",
    registry=REGISTRY,
)
BUNDLE_INFO = Info(
    "grok_pacs_bundle",
    "The model bundle this process has loaded",
    registry=REGISTRY,
)

# Series with a fixed label set start at 0, so dashboards and rate() see them before the first event.
for _outcome in ("accepted", "rejected"):
    ASSOCIATIONS.labels(outcome=_outcome)
for _outcome in ("succeeded", "failed"):
    JOBS.labels(outcome=_outcome)
for _kind in ("transient", "permanent"):
    SR_DELIVERY_FAILURES.labels(kind=_kind)
for _outcome in ("passed", "failed"):
    NARRATIVES.labels(outcome=_outcome)
for _outcome in ("uploaded", "refused", "store_down", "lost"):
    UPLOADS.labels(outcome=_outcome)
for _kind in ("study", "result"):
    REAPED.labels(kind=_kind)
for _what in ("files", "rows"):
    PURGED_STUDIES.labels(what=_what)


def purged(studies: int, rows: int, nbytes: int) -> None:
    """One retention pass: studies whose files went, studies whose rows went, bytes freed."""
    PURGED_STUDIES.labels(what="files").inc(studies)
    PURGED_STUDIES.labels(what="rows").inc(rows)
    PURGED_BYTES.inc(nbytes)


def association_accepted() -> None:
    ASSOCIATIONS.labels(outcome="accepted").inc()


def association_rejected() -> None:
    ASSOCIATIONS.labels(outcome="rejected").inc()


def connection_dropped(reason: str) -> None:
    CONNECTIONS_DROPPED.labels(reason=reason).inc()


def instance_received(sop_class_uid: str, nbytes: int) -> None:
    """Count one stored instance and the bytes written for it."""
    INSTANCES_RECEIVED.labels(sop_class=sop_class_uid).inc()
    BYTES_RECEIVED.inc(nbytes)


def instance_duplicate() -> None:
    INSTANCES_DUPLICATE.inc()


def instance_failed(reason: str) -> None:
    """Count one refused or failed C-STORE; `reason` is a short fixed word such as "disk_full"."""
    INSTANCES_FAILED.labels(reason=reason).inc()


def upload(outcome: str) -> None:
    """Count one uploader outcome: "uploaded", "refused", "store_down" or "lost"."""
    UPLOADS.labels(outcome=outcome).inc()


def reaper_pass(oldest_unfinished_s: float, studies: int, results: int) -> None:
    """Record one reaper pass: the oldest unfinished study's age, and the jobs it published again."""
    OLDEST_UNFINISHED.set(oldest_unfinished_s)
    REAPED.labels(kind="study").inc(studies)
    REAPED.labels(kind="result").inc(results)


def observe_stage(stage: str, seconds: float) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown job stage {stage!r}; expected one of {', '.join(STAGES)}")
    JOB_SECONDS.labels(stage=stage).observe(seconds)


@contextmanager
def time_stage(stage: str) -> Iterator[None]:
    """Time the block as one observation of `stage` (also when it raises: slow failures count)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        observe_stage(stage, time.perf_counter() - start)


def job_finished(succeeded: bool) -> None:
    JOBS.labels(outcome="succeeded" if succeeded else "failed").inc()


def job_started(last_received_at: float | None, quiet_period: float) -> None:
    """Observe queue_wait for a job starting now on a study last received at `last_received_at` (epoch s)."""
    if last_received_at is not None:
        observe_stage("queue_wait", max(0.0, time.time() - last_received_at - quiet_period))


def job_done(last_received_at: float | None, succeeded: bool) -> None:
    """Count a finished job and observe its total latency from the study's last instance."""
    job_finished(succeeded)
    if last_received_at is not None:
        observe_stage("total", max(0.0, time.time() - last_received_at))


def sr_delivered() -> None:
    SR_DELIVERED.inc()


def sr_delivery_failed(permanent: bool) -> None:
    SR_DELIVERY_FAILURES.labels(kind="permanent" if permanent else "transient").inc()


def narrative_reasons(reasons: Iterable[str]) -> None:
    """Start every reason's failure series at 0 (the analysis layer owns the reason codes)."""
    for reason in reasons:
        NARRATIVE_FAILURES.labels(reason=reason)


def gate_judged(modality: str, gradability: str, reasons: Iterable[str] = ()) -> None:
    """Count one gate verdict (the real-world ungradable rate is a quality figure a site watches)."""
    GATE_VERDICTS.labels(modality=modality, gradability=gradability).inc()
    for reason in dict.fromkeys(reasons):
        GATE_REASONS.labels(reason=reason).inc()


NARRATIVE_OUTCOMES = ("passed", "retried", "failed")  #: grok_pacs_narratives_total's outcomes


def narrative_failed(reasons: Iterable[str]) -> None:
    """Count one generation that failed the validator: each distinct reason once."""
    for reason in dict.fromkeys(reasons):
        NARRATIVE_FAILURES.labels(reason=reason).inc()


def narrative_outcome(outcome: str) -> None:
    """Count one eye's findings by outcome (NARRATIVE_OUTCOMES)."""
    if outcome not in NARRATIVE_OUTCOMES:
        raise ValueError(f"narrative outcome {outcome!r} is not one of {NARRATIVE_OUTCOMES}")
    NARRATIVES.labels(outcome=outcome).inc()


def model_loaded(component: str, seconds: float, bundle: Path | str | None = None, version: str = "") -> None:
    """Record a model load; with `bundle`, also mark the bundle loaded for the health check."""
    MODEL_LOAD_SECONDS.labels(component=component).set(seconds)
    if bundle is not None:
        BUNDLE_INFO.info({"path": str(bundle), "version": version})
        health.BUNDLE_STATE.mark_loaded(Path(bundle), version)


class _CallbackGauges:
    """A collector that asks its sources for their values at scrape time (studies by state, disk)."""

    def __init__(self) -> None:
        self._study_source: Callable[[], Mapping[str, int]] | None = None
        self._data_dir: Path | None = None
        self._lock = threading.Lock()

    def set_study_source(self, source: Callable[[], Mapping[str, int]] | None) -> None:
        with self._lock:
            self._study_source = source

    def set_data_dir(self, data_dir: Path | None) -> None:
        with self._lock:
            self._data_dir = data_dir

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            source, data_dir = self._study_source, self._data_dir
        if source is not None:
            studies = GaugeMetricFamily("grok_pacs_studies", "Studies in the index, by state", labels=["state"])
            for state, count in sorted(source().items()):
                studies.add_metric([state], count)
            yield studies
        if data_dir is not None:
            free = health.free_bytes(data_dir)
            if free is not None:
                yield GaugeMetricFamily(
                    "grok_pacs_data_dir_free_bytes", "Free bytes on the data directory's filesystem", value=free
                )

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # values only exist at scrape time; nothing to describe up front


_CALLBACKS = _CallbackGauges()
REGISTRY.register(_CALLBACKS)


def watch_studies(source: Callable[[], Mapping[str, int]] | None) -> None:
    """Export `grok_pacs_studies{state}` from `source()` (e.g. the index's counts) at every scrape."""
    _CALLBACKS.set_study_source(source)


def watch_data_dir(data_dir: Path | None) -> None:
    """Export `grok_pacs_data_dir_free_bytes` of `data_dir`'s filesystem at every scrape."""
    _CALLBACKS.set_data_dir(data_dir)
