"""Drift figures on /metrics, read as an operator reads them: a results register (the embedded SQLite file and
a real PostgreSQL server) filled with two bundle versions' results and clinicians' reviews, the drift
monitor's pass, then /metrics scraped over HTTP: counts per label and window, confidence histogram,
Indeterminate and not-gradable rates, dispositions, review outcomes, agreement, and the label mix's
population-stability index (above 0.2 for a shifted mix, about 0 for an unchanged one). Then the wiring:
`grok-pacs listen` exports the same figures from its own register."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from sqlalchemy import update

from devtools.ports import free_port
from grok_pacs.config import load_settings
from grok_pacs.ops import drift, observability
from grok_pacs.store import db
from grok_pacs.store.register import ResultRecord, ResultRegister, ReviewOutcome
from tests.helpers.metrics_scrape import Samples, running, scrape, value, wait_for

HOUR = 3600.0
PROBABILITY = {"AMD": 0.9, "Normal": 0.7, "Glaucoma": 0.55, "Indeterminate": 0.3, "": None}
DISPOSITION = {
    "AMD": "Refer to a retina clinic within 2 weeks",
    "Normal": "Rescreen in 12 months",
    "Glaucoma": "Refer to glaucoma clinic",
    "Indeterminate": "Refer for a clinician's reading",
    "": "Retake the images",
}
SAME_MIX = {"AMD": 10, "Normal": 20, "Glaucoma": 10}
SHIFTED_MIX = {"AMD": 24, "Normal": 4, "Glaucoma": 2, "Indeterminate": 4, "": 6}


def _results(bundle: str, mix: dict[str, int], prefix: str) -> list[ResultRecord]:
    records, n = [], 0
    for label, count in mix.items():
        for _ in range(count):
            n += 1
            study = f"{prefix}.{n}"
            records.append(
                ResultRecord(
                    sr_uid=f"{study}.9",
                    study_uid=study,
                    study_version=1,
                    bundle_version=bundle,
                    eye="R",
                    label=label,
                    probability=PROBABILITY[label],
                    disposition=DISPOSITION[label],
                    gradability="gradable" if label else "ungradable",
                    pdf_uid=f"{study}.8",
                    cfp_uid=f"{study}.1",
                    oct_uid=f"{study}.2",
                )
            )
    return records


def _add(register: ResultRegister, records: list[ResultRecord], created_at: float) -> None:
    register.add_many(records)
    uids = [r.sr_uid for r in records]
    with register.engine.begin() as conn:  # registered "then": the windows are by registration time
        conn.execute(update(db.results).where(db.results.c.sr_uid.in_(uids)).values(created_at=created_at))


def fill(register: ResultRegister, now: float) -> None:
    """Bundle 1.0 shifts from SAME_MIX to SHIFTED_MIX and is reviewed; 2.0 keeps SAME_MIX; 0.9 is too old."""
    recent, reference = now - 0.5 * HOUR, now - 1.5 * HOUR
    _add(register, _results("1.0", SAME_MIX, "1.1"), reference)
    shifted = _results("1.0", SHIFTED_MIX, "1.2")
    _add(register, shifted, recent)
    _add(register, _results("2.0", SAME_MIX, "2.1"), reference)
    _add(register, _results("2.0", SAME_MIX, "2.2"), recent)
    _add(register, _results("0.9", {"Normal": 5}, "0.9"), now - 3 * HOUR)
    replaced = _results("1.0", {"AMD": 1}, "1.3")  # a later study version replaced it: not counted
    _add(register, replaced, recent)
    register.mark_replaced([replaced[0].sr_uid], by=shifted[0].sr_uid, rejection_uid="1.3.99")
    amd, normal = shifted[:24], shifted[24:28]
    reviews = [(r, ReviewOutcome.ACCEPTED, "") for r in amd[:6]]
    reviews += [(r, ReviewOutcome.REJECTED, "") for r in normal[:2]]
    reviews += [(r, ReviewOutcome.CORRECTED, "Normal") for r in amd[6:8]]
    for record, outcome, label in reviews:
        register.mark_delivered(record.sr_uid, at=now)
        register.record_review(record.sr_uid, outcome=outcome, reviewer="dr.who", label=label)


def expected_psi(recent: dict[str, int], reference: dict[str, int]) -> float:
    """The textbook PSI, shares of an absent label taken as 1e-4."""
    total = 0.0
    for key in set(recent) | set(reference):
        p = max(recent.get(key, 0) / sum(recent.values()), 1e-4)
        q = max(reference.get(key, 0) / sum(reference.values()), 1e-4)
        total += (p - q) * math.log(p / q)
    return total


def assert_figures(samples: Samples) -> None:
    one = {"bundle_version": "1.0"}
    assert value(samples, "grok_pacs_drift_results", window="recent", **one) == 40
    assert value(samples, "grok_pacs_drift_results", window="reference", **one) == 40
    recent_labels = {
        label: value(samples, "grok_pacs_drift_stated_labels", window="recent", label=label, **one)
        for label in ("AMD", "Normal", "Glaucoma", "Indeterminate", "ungradable", "Diabetes")
    }
    assert recent_labels == {
        "AMD": 24,
        "Normal": 4,
        "Glaucoma": 2,
        "Indeterminate": 4,
        "ungradable": 6,
        "Diabetes": 0,
    }
    assert value(samples, "grok_pacs_drift_rate", window="recent", kind="indeterminate", **one) == pytest.approx(0.1)
    assert value(samples, "grok_pacs_drift_rate", window="recent", kind="ungradable", **one) == pytest.approx(0.15)
    assert value(samples, "grok_pacs_drift_rate", window="reference", kind="ungradable", **one) == 0
    # Confidence histogram of the recent window: 34 results with a probability (6 ungradable have none).
    assert value(samples, "grok_pacs_drift_confidence_count", **one) == 34
    assert value(samples, "grok_pacs_drift_confidence_bucket", le="0.5", **one) == 4
    assert value(samples, "grok_pacs_drift_confidence_bucket", le="0.7", **one) == 10
    assert value(samples, "grok_pacs_drift_confidence_bucket", le="+Inf", **one) == 34
    assert value(samples, "grok_pacs_drift_confidence_sum", **one) == pytest.approx(
        24 * 0.9 + 4 * 0.7 + 2 * 0.55 + 4 * 0.3
    )
    assert value(samples, "grok_pacs_drift_dispositions", disposition=DISPOSITION["AMD"], **one) == 24
    assert value(samples, "grok_pacs_drift_dispositions", disposition=DISPOSITION[""], **one) == 6
    reviews = {o: value(samples, "grok_pacs_drift_reviews", outcome=o, **one) for o in drift.OUTCOMES}
    assert reviews == {"accepted": 6, "rejected": 2, "corrected": 2}
    assert value(samples, "grok_pacs_drift_agreement", kind="accepted", **one) == pytest.approx(0.6)
    assert value(samples, "grok_pacs_drift_agreement", kind="label", **one) == pytest.approx(6 / 8)
    shifted = {k or "ungradable": v for k, v in SHIFTED_MIX.items()}
    psi_shifted = value(samples, "grok_pacs_drift_label_psi", **one)
    assert psi_shifted > 0.2 and psi_shifted == pytest.approx(expected_psi(shifted, SAME_MIX))
    assert value(samples, "grok_pacs_drift_label_psi", bundle_version="2.0") == pytest.approx(0.0, abs=1e-9)
    # Bundle 2.0 has no review: its agreement is absent, not 0 (an alert must not fire on no data).
    assert ("grok_pacs_drift_agreement", frozenset({("bundle_version", "2.0"), ("kind", "accepted")})) not in samples
    assert not any(dict(labels).get("bundle_version") == "0.9" for _, labels in samples)
    assert value(samples, "grok_pacs_drift_window_seconds") == HOUR


def test_drift_figures_from_the_register_on_metrics(database, tmp_path: Path) -> None:
    register = ResultRegister(database)
    now = time.time()
    fill(register, now)
    settings = load_settings(data_dir=tmp_path / "data", metrics_port=free_port(), broker_url="")
    server = observability.start_server(settings, "worker")
    monitor = drift.DriftMonitor(register, drift.COLLECTOR, window_s=HOUR, interval_s=3600)
    try:
        monitor.refresh(now)
        samples = scrape(server.port)
        assert_figures(samples)
        assert value(samples, "grok_pacs_drift_updated_timestamp_seconds") == pytest.approx(now)
    finally:
        monitor.stop()
        server.close()
        register.close()
    assert not any(name.startswith("grok_pacs_drift") for name, _ in scrape_after_stop(settings))


def scrape_after_stop(settings) -> Samples:
    """A stopped monitor withdraws its figures: nothing drift-related is left on /metrics."""
    server = observability.start_server(settings, "worker")
    try:
        return scrape(server.port)
    finally:
        server.close()


def test_psi_refuses_an_empty_window_and_is_zero_for_the_same_mix() -> None:
    assert drift.psi({"AMD": 3, "Normal": 1}, {"AMD": 30, "Normal": 10}) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least one result"):
        drift.psi({}, {"AMD": 1})


def test_grok_pacs_listen_exports_the_drift_of_its_register(tmp_path: Path) -> None:
    data, metrics_port = tmp_path / "data", free_port()
    settings = load_settings(data_dir=data, broker_url="")
    data.mkdir()
    register = ResultRegister(settings.resolved_database_url)
    fill(register, time.time())
    register.close()
    env = {
        "GROK_PACS_DATA_DIR": str(data),
        "GROK_PACS_PORT": str(free_port()),
        "GROK_PACS_BROKER_URL": "",
        "GROK_PACS_BIND_ADDRESS": "127.0.0.1",
        "GROK_PACS_DRIFT_WINDOW_HOURS": "1",
        "GROK_PACS_DRIFT_INTERVAL_S": "3600",
    }
    with running(tmp_path, "listen", env, metrics_port):
        wait_for(lambda: any(n == "grok_pacs_drift_results" for n, _ in scrape(metrics_port)), "the drift figures")
        assert_figures(scrape(metrics_port))
