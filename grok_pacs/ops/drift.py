"""Drift of the model in service, per bundle version, from the results register: what the model states
(label mix, confidence, Indeterminate and not-gradable rates, dispositions) and what the clinicians say of
it (review outcomes, agreement), and a population-stability index (PSI) of the stated-label mix.

Two windows of `drift_window_hours`, by the time each result was registered: `recent` (the last window)
and `reference` (the window before it, of the same bundle version). The PSI compares the recent label mix
with the reference mix. A REPLACED result is left out: the result of the study's later version counts
for that eye instead.

Cost: `DriftMonitor.refresh` reads the two windows with one query (the register's `drift_rows`: the
nine columns it needs, not whole records) every `drift_interval_s` and keeps the figures; a scrape only
copies them (`DriftCollector`). So scrapes never touch the database (several Prometheus servers or a
database outage cannot slow /metrics), and the register is read once per interval whatever the scrape
rate: 0.24 s for 10,000 results in the windows on the embedded SQLite file (measured on a loaded
2-core box), once a minute by default. The source is handed in (the listener hands its
`ResultRegister`): `store` imports `ops`, not the other way.

No patient data reaches a label: labels are the bundle version, the window, a label of
`grok_pacs.domain.labels.Label` (or `ungradable`, `other`), a review outcome, and the disposition texts of
the disposition table (at most MAX_DISPOSITIONS per bundle version, the rest counted as `other`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric

from grok_pacs.config import Settings
from grok_pacs.domain.labels import Label
from grok_pacs.ops import metrics
from grok_pacs.ops.periodic import Periodic

log = logging.getLogger(__name__)

WINDOWS = ("recent", "reference")
UNGRADABLE = "ungradable"  #: the label series of results that state no diagnosis (the register's label "")
OTHER = "other"  #: a label or disposition outside the known set (never the raw text)
LABELS = (*(label.value for label in Label), UNGRADABLE)
OUTCOMES = ("accepted", "rejected", "corrected")
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
MAX_DISPOSITIONS = 32  #: distinct disposition series per bundle version; more are summed into `other`
MAX_DISPOSITION_CHARS = 120
PSI_FLOOR = 1e-4  #: a label absent from one window counts as this share (else the PSI is infinite)
REPLACED = "REPLACED"


class ResultRow(Protocol):
    """What the drift figures read of a result (`grok_pacs.store.register.ResultRecord` is one)."""

    @property
    def bundle_version(self) -> str: ...
    @property
    def label(self) -> str: ...
    @property
    def probability(self) -> float | None: ...
    @property
    def disposition(self) -> str: ...
    @property
    def gradability(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def review_outcome(self) -> str: ...
    @property
    def reviewed_label(self) -> str: ...
    @property
    def created_at(self) -> float: ...


class ResultSource(Protocol):
    """The register's read for drift windows (`ResultRegister.drift_rows`): every result registered at or
    after `t`, with the fields of ResultRow."""

    def drift_rows(self, t: float) -> Sequence[ResultRow]: ...


def psi(recent: Mapping[str, int], reference: Mapping[str, int]) -> float:
    """Population-stability index of two count vectors: sum of (p - q) * ln(p / q) over their categories,
    shares floored at PSI_FLOOR. 0 = the same mix; above 0.2 is the usual "significant shift"."""
    n_recent, n_reference = sum(recent.values()), sum(reference.values())
    if n_recent == 0 or n_reference == 0:
        raise ValueError("psi: both windows need at least one result")
    total = 0.0
    for key in set(recent) | set(reference):
        p = max(recent.get(key, 0) / n_recent, PSI_FLOOR)
        q = max(reference.get(key, 0) / n_reference, PSI_FLOOR)
        total += (p - q) * math.log(p / q)
    return total


@dataclass
class WindowTally:
    """One window's stated labels of one bundle version."""

    results: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    not_gradable: int = 0

    def add(self, row: ResultRow) -> None:
        self.results += 1
        self.labels[_label(row.label)] += 1
        self.not_gradable += row.gradability != "gradable"

    def rate(self, kind: str) -> float | None:
        """The share of `indeterminate` or `ungradable` (not gradable: ungradable or out of scope) results."""
        if not self.results:
            return None
        count = self.labels[Label.INDETERMINATE.value] if kind == "indeterminate" else self.not_gradable
        return count / self.results


@dataclass
class BundleDrift:
    """Every figure of one bundle version: both windows' label mixes; the rest over the recent window."""

    bundle_version: str
    recent: WindowTally = field(default_factory=WindowTally)
    reference: WindowTally = field(default_factory=WindowTally)
    probabilities: list[float] = field(default_factory=list)
    dispositions: Counter[str] = field(default_factory=Counter)
    reviews: Counter[str] = field(default_factory=Counter)
    labelled_reviews: int = 0  #: reviews that carry the clinician's label (accepted, corrected, some rejected)
    same_label: int = 0  #: of those, the clinician's label is the AI's

    def add_recent(self, row: ResultRow) -> None:
        self.recent.add(row)
        if row.probability is not None:
            self.probabilities.append(row.probability)
        self.dispositions[row.disposition[:MAX_DISPOSITION_CHARS]] += 1
        outcome = row.review_outcome.lower()
        if outcome in OUTCOMES:
            self.reviews[outcome] += 1
        if outcome and row.reviewed_label:
            self.labelled_reviews += 1
            self.same_label += row.reviewed_label == row.label

    @property
    def psi(self) -> float | None:
        if not self.recent.results or not self.reference.results:
            return None
        return psi(self.recent.labels, self.reference.labels)

    @property
    def agreement(self) -> float | None:
        """Accepted / reviewed: the share of reviewed results a clinician accepted as they were."""
        reviewed = sum(self.reviews.values())
        return self.reviews["accepted"] / reviewed if reviewed else None

    @property
    def label_agreement(self) -> float | None:
        """The share of clinicians' labels that are the AI's label."""
        return self.same_label / self.labelled_reviews if self.labelled_reviews else None


def tally(rows: Iterable[ResultRow], now: float, window_s: float) -> dict[str, BundleDrift]:
    """The figures of every bundle version with a result in the last two windows before `now`."""
    if window_s <= 0:
        raise ValueError(f"drift window must be positive, not {window_s} s")
    bundles: dict[str, BundleDrift] = {}
    for row in rows:
        if row.state == REPLACED or row.created_at < now - 2 * window_s:
            continue
        drift = bundles.get(row.bundle_version)
        if drift is None:  # not setdefault: a new BundleDrift per row would cost more than the tally
            drift = bundles[row.bundle_version] = BundleDrift(row.bundle_version)
        if row.created_at >= now - window_s:
            drift.add_recent(row)
        else:
            drift.reference.add(row)
    return bundles


def _label(value: str) -> str:
    if not value:
        return UNGRADABLE
    return value if value in LABELS else OTHER


def _bounded(dispositions: Counter[str]) -> Counter[str]:
    """The MAX_DISPOSITIONS most common texts; the rest summed into `other`."""
    kept = Counter(dict(dispositions.most_common(MAX_DISPOSITIONS)))
    rest = sum(dispositions.values()) - sum(kept.values())
    if rest:
        kept[OTHER] += rest
    return kept


def families(bundles: Mapping[str, BundleDrift], window_s: float, updated_at: float) -> list[Metric]:
    """The Prometheus families of a tally (what /metrics shows until the next refresh)."""
    results = GaugeMetricFamily(
        "grok_pacs_drift_results",
        "Results registered in the window (recent: the last drift_window_hours; reference: the window before), "
        "replaced results left out",
        labels=["bundle_version", "window"],
    )
    labels = GaugeMetricFamily(
        "grok_pacs_drift_stated_labels",
        "Results in the window by the label their SR states (ungradable: no diagnosis)",
        labels=["bundle_version", "window", "label"],
    )
    rates = GaugeMetricFamily(
        "grok_pacs_drift_rate",
        "Share of the window's results that are Indeterminate, or not gradable (ungradable or out of scope)",
        labels=["bundle_version", "window", "kind"],
    )
    for version, drift in sorted(bundles.items()):
        for window, counts in zip(WINDOWS, (drift.recent, drift.reference)):
            results.add_metric([version, window], counts.results)
            for label in (*LABELS, *([OTHER] if counts.labels[OTHER] else [])):
                labels.add_metric([version, window, label], counts.labels[label])
            for kind in ("indeterminate", "ungradable"):
                rate = counts.rate(kind)
                if rate is not None:
                    rates.add_metric([version, window, kind], rate)
    return [results, labels, rates, *_recent_families(bundles), *_meta_families(window_s, updated_at)]


def _recent_families(bundles: Mapping[str, BundleDrift]) -> Iterator[Metric]:
    confidence = HistogramMetricFamily(
        "grok_pacs_drift_confidence",
        "Calibrated probability of the stated label, results of the recent window (ungradable ones have none)",
        labels=["bundle_version"],
    )
    dispositions = GaugeMetricFamily(
        "grok_pacs_drift_dispositions",
        "Results of the recent window by the eye's disposition text",
        labels=["bundle_version", "disposition"],
    )
    reviews = GaugeMetricFamily(
        "grok_pacs_drift_reviews",
        "Results of the recent window reviewed by a clinician, by outcome",
        labels=["bundle_version", "outcome"],
    )
    agreement = GaugeMetricFamily(
        "grok_pacs_drift_agreement",
        "Agreement with clinicians over the recent window's reviews: accepted = accepted / reviewed; label = "
        "the clinician's label is the AI's / reviews with a clinician's label (absent without reviews)",
        labels=["bundle_version", "kind"],
    )
    stability = GaugeMetricFamily(
        "grok_pacs_drift_label_psi",
        "Population-stability index of the stated-label mix, recent window against reference window (absent "
        "while either is empty; above 0.2 is a significant shift)",
        labels=["bundle_version"],
    )
    for version, drift in sorted(bundles.items()):
        confidence.add_metric([version], _buckets(drift.probabilities), sum(drift.probabilities))
        for text, count in sorted(_bounded(drift.dispositions).items()):
            dispositions.add_metric([version, text], count)
        for outcome in OUTCOMES:
            reviews.add_metric([version, outcome], drift.reviews[outcome])
        for kind, value in (("accepted", drift.agreement), ("label", drift.label_agreement)):
            if value is not None:
                agreement.add_metric([version, kind], value)
        if drift.psi is not None:
            stability.add_metric([version], drift.psi)
    yield from (confidence, dispositions, reviews, agreement, stability)


def _buckets(probabilities: Sequence[float]) -> list[tuple[str, float]]:
    cumulative = [(str(edge), float(sum(p <= edge for p in probabilities))) for edge in CONFIDENCE_BUCKETS]
    return [*cumulative, ("+Inf", float(len(probabilities)))]


def _meta_families(window_s: float, updated_at: float) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "grok_pacs_drift_window_seconds", "Length of each drift window (drift_window_hours)", window_s
    )
    yield GaugeMetricFamily(
        "grok_pacs_drift_updated_timestamp_seconds",
        "When the drift figures were last computed (UNIX time; stale when the refresh fails, see the log)",
        updated_at,
    )


class DriftCollector:
    """Serves the last refresh's families at every scrape; nothing before the first refresh."""

    def __init__(self) -> None:
        self._families: list[Metric] = []
        self._lock = threading.Lock()

    def update(self, families: list[Metric]) -> None:
        with self._lock:
            self._families = families

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            yield from self._families

    def describe(self) -> list[Metric]:
        return []  # the series exist only once a refresh has run


class DriftMonitor:
    """Recomputes the drift figures from `source` every `interval_s` and hands them to `collector`."""

    def __init__(self, source: ResultSource, collector: DriftCollector, window_s: float, interval_s: float) -> None:
        if window_s <= 0 or interval_s <= 0:
            raise ValueError(f"drift: window {window_s} s and interval {interval_s} s must be positive")
        self.source, self.collector = source, collector
        self.window_s, self.interval_s = window_s, interval_s
        self._periodic = Periodic("drift", self.refresh, interval_s, first_delay=0.0)

    def refresh(self, now: float | None = None) -> dict[str, BundleDrift]:
        """One pass: read the two windows, tally them, publish the families. Returns the tally."""
        now = time.time() if now is None else now
        bundles = tally(self.source.drift_rows(now - 2 * self.window_s), now, self.window_s)
        self.collector.update(families(bundles, self.window_s, now))
        return bundles

    def start(self) -> DriftMonitor:
        self._periodic.start()
        return self

    def stop(self) -> None:
        """Stop refreshing and withdraw the figures (a stopped process no longer vouches for them)."""
        self._periodic.stop()
        self.collector.update([])


#: The collector on /metrics (`grok_pacs.ops.metrics.REGISTRY`) that the running monitor feeds.
COLLECTOR = DriftCollector()
metrics.REGISTRY.register(COLLECTOR)


def maybe_start(settings: Settings, source: ResultSource) -> DriftMonitor | None:
    """Start the monitor that keeps /metrics' drift figures, unless `drift_interval_s` is 0 (off)."""
    if not settings.drift_interval_s:
        return None
    window_s = settings.drift_window_hours * 3600.0
    return DriftMonitor(source, COLLECTOR, window_s, settings.drift_interval_s).start()
