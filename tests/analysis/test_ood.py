"""The device-shift check: fitted on a bundle's features of the training and validation eyes (training.ood),
stored in the bundle (hashed), and the engine leaves an eye whose image is unlike the training images
Indeterminate, saying why."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from devtools.tiny_bundle import copy_bundle
from grok_pacs.analysis.bundle import BundleError, load_bundle
from grok_pacs.analysis.engine import Engine
from grok_pacs.analysis.imaging import EyeImages
from grok_pacs.analysis.ood import OOD_FILE, OOD_REASON, FeatureDistribution, OodModel, ood_impression
from grok_pacs.analysis.result import Eye
from grok_pacs.domain.labels import Label
from training.ood import add_to_bundle, fit_ood
from training.phantom import generate_cohort
from training.phantom.cohort import plan_cohort, render_subject
from training.phantom.devices import HELD_OUT_DEVICES


def _features(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    """Correlated 48-d features (a low-rank structure, as encoder features have) plus a shift."""
    mixing = np.random.default_rng(99).normal(size=(8, 48))
    return rng.normal(size=(n, 8)) @ mixing + 0.3 * rng.normal(size=(n, 48)) + shift


def test_fitted_on_validation_passes_in_distribution_and_flags_shifted_features() -> None:
    rng = np.random.default_rng(0)
    model = FeatureDistribution.fit(_features(rng, 120), _features(rng, 200), quantile=0.99)
    fresh = [model.distance(f) / model.threshold for f in _features(rng, 400)]
    assert np.mean(np.array(fresh) <= 1.0) >= 0.95  # ~99 % of in-distribution eyes pass
    shifted = [model.distance(f) / model.threshold for f in _features(rng, 50, shift=1.5)]
    assert min(shifted) > 1.0  # every shifted eye is flagged
    with pytest.raises(ValueError, match="validation"):
        FeatureDistribution.fit(_features(rng, 2), _features(rng, 5))


def test_impression_names_the_reason_only_for_a_shifted_modality() -> None:
    assert ood_impression({"CFP": 0.7, "OCT": 0.99}) is None
    text = ood_impression({"CFP": 0.7, "OCT": 2.5})
    assert OOD_REASON in text and "OCT 2.5x" in text and "CFP" not in text


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """21 phantom subjects on the reference device: 3 per label, so one per label in val and in test."""
    return generate_cohort(tmp_path_factory.mktemp("ood-cohort"), 21, seed=4, dicom=False, workers=2, progress=False)


def test_engine_marks_an_eye_from_the_held_out_device_indeterminate(tiny_bundle, tmp_path, cohort) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    model, summary = fit_ood(bundle, cohort, quantile=0.99)
    assert summary["val_pass_rate"] >= 0.9 and summary["train_eyes"] >= summary["val_eyes"] > 0
    add_to_bundle(bundle, model)
    assert load_bundle(bundle).manifest["ood"] == {"file": OOD_FILE, "quantile": 0.99}
    engine = Engine.from_bundle(bundle)
    plan = next(p for p in plan_cohort(21, seed=4) if p.split == "val")
    _, clean = render_subject(plan, seed=4)
    _, shifted = render_subject(replace(plan, device=HELD_OUT_DEVICES[0]), seed=4)
    same, other = engine.analyze_batch([EyeImages(Eye.RIGHT, e.cfp, e.volume, (), {}) for e in (clean[0], shifted[0])])
    assert not same.out_of_distribution and set(same.shift_scores) == {"CFP", "OCT"}
    assert other.out_of_distribution and other.label is Label.INDETERMINATE
    assert OOD_REASON in other.impression and not other.diagnosed
    (bundle / OOD_FILE).write_bytes(b"tampered")
    with pytest.raises(BundleError, match=OOD_FILE):
        load_bundle(bundle)


def test_a_bundle_without_the_file_keeps_todays_behaviour(tiny_bundle) -> None:
    engine = Engine.from_bundle(tiny_bundle)
    assert engine.ood is None and "ood" not in json.loads((tiny_bundle / "manifest.json").read_text())
    _, eyes = render_subject(replace(plan_cohort(7, seed=4)[0], device=HELD_OUT_DEVICES[0]), seed=4)
    report = engine.analyze_images("R", eyes[0].cfp, eyes[0].volume)
    assert report.shift_scores == {} and not report.out_of_distribution


def test_model_round_trips_through_its_file(tmp_path) -> None:
    rng = np.random.default_rng(1)
    dist = FeatureDistribution.fit(_features(rng, 60), _features(rng, 30))
    model = OodModel({"CFP": dist, "OCT": dist}, 0.99)
    model.save(tmp_path / OOD_FILE)
    loaded = OodModel.load(tmp_path / OOD_FILE)
    probe = _features(rng, 1)[0]
    assert loaded.scores({"OCT": probe}) == model.scores({"OCT": probe})
