"""The typical biomarker estimate error: measured on a bundle's validation eyes (training.estimate_error),
stored in the bundle (hashed), carried on every served estimate, and read by the urgent disposition rows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from devtools.tiny_bundle import copy_bundle
from grok_pacs.analysis.bundle import BundleError, load_bundle
from grok_pacs.analysis.engine import Engine
from grok_pacs.analysis.estimate_error import ERROR_FILE, EstimateErrors
from grok_pacs.analysis.imaging import read_cfp, read_oct_volume
from training.estimate_error import add_to_bundle, fit_estimate_errors
from training.manifest import load_manifest
from training.phantom import generate_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """21 phantom subjects: three per label, so one per label in validation."""
    return generate_cohort(tmp_path_factory.mktemp("err-cohort"), 21, seed=5, dicom=False, workers=2, progress=False)


def test_the_error_is_measured_on_validation_eyes_and_served_with_each_estimate(tiny_bundle, tmp_path, cohort):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    errors = fit_estimate_errors(bundle, cohort, quantile=0.9)
    val = [r for r in load_manifest(cohort) if r.split == "val"]
    assert errors.n_eyes == len(val) > 0 and errors.quantile == 0.9 and len(errors.errors) == 37
    # The figure is what it says: the 0.9 quantile of |estimate - measured| over the validation eyes.
    engine = Engine.from_bundle(bundle, device="cpu")
    gaps = []
    for r in val:
        served = engine.biomarker_estimates(read_cfp(r.cfp_path), read_oct_volume(r.oct_path))
        gaps.append(abs(served["mt_central"] - r.biomarkers["mt_central"]))
    assert errors.errors["mt_central"] == pytest.approx(float(np.quantile(gaps, 0.9)), abs=1e-3)

    add_to_bundle(bundle, errors)
    assert load_bundle(bundle).manifest["estimate_error"] == {"file": ERROR_FILE, "quantile": 0.9}
    report = Engine.from_bundle(bundle, device="cpu").analyze_eye("R", val[0].cfp_path, val[0].oct_path)
    served = {b.key: b.error for b in report.biomarkers}
    assert served["mt_central"] == errors.errors["mt_central"] and all(e is not None for e in served.values())
    assert report.to_dict()["biomarkers"][0]["error"] is not None  # the stored result keeps it
    (bundle / ERROR_FILE).write_text("{}")
    with pytest.raises(BundleError, match=ERROR_FILE):
        load_bundle(bundle)


def test_a_bundle_without_the_file_serves_estimates_without_an_error(tiny_bundle, cohort):
    record = load_manifest(cohort)[0]
    engine = Engine.from_bundle(tiny_bundle, device="cpu")
    assert engine.estimate_errors is None and "estimate_error" not in json.loads(
        (tiny_bundle / "manifest.json").read_text()
    )
    report = engine.analyze_eye(record.eye, record.cfp_path, record.oct_path)
    assert all(b.error is None for b in report.biomarkers)


@pytest.mark.parametrize(
    "quantile, n_eyes, errors, message",
    [
        (0.3, 10, {}, "quantile"),
        (0.9, 0, {}, "n_eyes"),
        (0.9, 10, {"not_a_biomarker": 1.0}, "not a known biomarker"),
        (0.9, 10, {"mt_central": math.nan}, "mt_central"),
        (0.9, 10, {"mt_central": -1.0}, "mt_central"),
    ],
)
def test_errors_that_cannot_be_right_fail_loudly(quantile, n_eyes, errors, message):
    with pytest.raises(ValueError, match=message):
        EstimateErrors(quantile, n_eyes, errors)
    good = EstimateErrors(0.9, 10, {"mt_central": 8.5})
    assert EstimateErrors.from_dict(good.to_dict()) == good
    with pytest.raises(ValueError, match="format"):
        EstimateErrors.from_dict({**good.to_dict(), "format": "other/1"})
