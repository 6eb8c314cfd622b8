"""The honest-benchmark figures (training.benchmark.probe, training.benchmark.honesty): a linear probe on
the phantom's measured biomarkers names the label, one on noise does not; text health counts what the
validator withheld."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from grok_pacs.analysis.validation import validate_narrative
from grok_pacs.domain.biomarkers import BIOMARKERS
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS
from training.benchmark.honesty import text_health
from training.benchmark.probe import probe_macro_f1
from training.phantom.sampling import sample_subject


def phantom_eyes(per_label: int, seed: int):
    rows, labels = [], []
    for index, label in enumerate(DIAGNOSTIC_LABELS):
        for i in range(per_label):
            eye = sample_subject(f"P{i}", label, np.random.default_rng([seed, index, i])).eyes[i % 2]
            rows.append(eye.biomarkers)
            labels.append(label)
    return rows, labels


def test_probe_on_measured_biomarkers_names_the_label_and_on_noise_does_not():
    train, test = phantom_eyes(8, 1), phantom_eyes(3, 2)
    ceiling = probe_macro_f1(*train, *test)
    assert ceiling["macro_f1"] >= 0.9 and ceiling["n_train"] == 56 and ceiling["n_test"] == 21, ceiling
    rng = np.random.default_rng(0)
    noise = [[{b.key: float(rng.normal()) for b in BIOMARKERS} for _ in rows] for rows in (train[0], test[0])]
    chance = probe_macro_f1(noise[0], train[1], noise[1], test[1])
    assert chance["macro_f1"] < 0.5, chance


def test_text_health_counts_withheld_narratives_and_their_reasons():
    healthy = "The optic disc is healthy with a cup-to-disc ratio of 0.31. The macula is normal. Diagnosis: Normal"
    looping = "The retina shows " + ", ".join(["no haemorrhages or exudates"] * 12) + "."
    reports = [
        SimpleNamespace(narrative_check=validate_narrative(text), first_attempt=None) for text in (healthy, looping)
    ]
    reports.append(SimpleNamespace(narrative_check=None, first_attempt=None))  # an ungradable eye: never generated
    health = text_health(reports)
    assert health["n"] == 3 and health["validated"] == 2 and health["passed_share"] == 0.5, health
    assert "missing_diagnosis" in health["failure_reasons"], health
    assert health["first_attempt_passed_share"] == 0.5 and health["retried"] == 0, health
    # An eye whose first text failed and whose retry passed: served as passed, counted as a first-attempt failure.
    too_short = validate_narrative("Too short. Diagnosis: Normal")
    reports.append(SimpleNamespace(narrative_check=validate_narrative(healthy), first_attempt=too_short))
    health = text_health(reports)
    assert (health["passed_share"], health["first_attempt_passed_share"], health["retried"]) == (2 / 3, 1 / 3, 1)
    assert health["failure_reasons"]["too_short"] == 1, health


def test_the_benchmark_recovers_the_scores_before_a_bundle_calibration() -> None:
    """ECE before calibration is measured on the served (calibrated) scores with the calibration undone."""
    from grok_pacs.analysis.label_calibration import Calibration

    raw = {"Normal": 0.7, "Glaucoma": 0.2, "AMD": 0.1}
    for temperature in (0.5, 1.0, 3.0):
        served = Calibration(temperature=temperature).apply(raw)
        assert Calibration(temperature=temperature).invert(served) == pytest.approx(raw)
        mixed = Calibration(temperature=temperature, method="temperature+uniform", uniform=0.2)
        assert mixed.invert(mixed.apply(raw)) == pytest.approx(raw)
    assert Calibration(temperature=2.0).invert({}) == {}
