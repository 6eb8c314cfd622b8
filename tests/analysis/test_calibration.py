"""Calibrated probabilities: temperature fitted in training (training.calibration), stored in the bundle with
its manifest entry and hash, loaded and applied by the engine; the Indeterminate threshold a site setting."""

from __future__ import annotations

import json

import numpy as np
import pytest

from devtools.tiny_bundle import copy_bundle, lm_decides
from grok_pacs.analysis.bundle import BundleError, load_bundle
from grok_pacs.analysis.engine import Engine
from grok_pacs.analysis.label_calibration import CALIBRATION_FILE, Calibration, CalibrationError
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS
from tests.helpers.ophthalmic_dicom import fundus_pixels, oct_pixels
from training.calibration import add_to_bundle, calibrate, expected_calibration_error, fit_temperature

LABELS = [label.value for label in DIAGNOSTIC_LABELS]


def overconfident(n: int = 4000, sharpen: float = 3.0, seed: int = 0):
    """Scores from a model whose logits are `sharpen` times too large (true temperature = sharpen)."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, len(LABELS), n)
    logits = rng.normal(0, 1.0, (n, len(LABELS)))
    logits[np.arange(n), truth] += 1.2
    # Draw the true labels from the calibrated model so that T = sharpen is the right answer.
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = [LABELS[int(rng.choice(len(LABELS), p=p))] for p in probs]
    sharp = np.exp(sharpen * logits)
    sharp /= sharp.sum(1, keepdims=True)
    return [dict(zip(LABELS, map(float, row))) for row in sharp], labels


def test_temperature_fit_recovers_overconfidence_and_lowers_ece():
    scores, labels = overconfident()
    temperature = fit_temperature(scores, labels)
    assert 2.4 < temperature < 3.6
    cal = calibrate(scores, labels, "synthetic")
    assert cal.ece_before > 0.15 and cal.ece_after <= 0.05
    assert expected_calibration_error([cal.apply(s) for s in scores], labels) == pytest.approx(cal.ece_after)


def confidently_wrong(n: int, error_rate: float = 0.1, seed: int = 0):
    """Scores of a model that is wrong on `error_rate` of the eyes with the same margin as when right: a
    pattern it misread. No temperature can calibrate it; the uniform share can."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, len(LABELS), n)
    wrong = rng.random(n) < error_rate
    said = np.where(wrong, (truth + 1 + rng.integers(0, len(LABELS) - 1, n)) % len(LABELS), truth)
    logits = rng.normal(0, 1.0, (n, len(LABELS)))
    logits[np.arange(n), said] += rng.uniform(12, 20, n)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return [dict(zip(LABELS, map(float, row))) for row in probs], [LABELS[t] for t in truth]


def test_a_uniform_share_calibrates_what_no_temperature_can():
    """Confident errors: the temperature alone leaves ECE high on held-out eyes; the mixture meets 0.05,
    keeps every eye's best label, and caps the confidence at the validation accuracy."""
    scores, labels = confidently_wrong(600)
    val, test = (scores[:300], labels[:300]), (scores[300:], labels[300:])
    only_t = calibrate(*val, "synthetic", method="temperature")
    mixed = calibrate(*val, "synthetic", method="temperature+uniform")
    assert mixed.method == "temperature+uniform" and 0.05 < mixed.uniform < 0.2, mixed
    assert expected_calibration_error([only_t.apply(s) for s in test[0]], test[1]) > 0.05
    assert expected_calibration_error([mixed.apply(s) for s in test[0]], test[1]) <= 0.05
    for s in test[0]:
        assert max(mixed.apply(s), key=mixed.apply(s).get) == max(s, key=s.get)
        assert max(mixed.apply(s).values()) <= 1 - mixed.uniform * (len(LABELS) - 1) / len(LABELS) + 1e-9


def test_an_error_free_validation_set_does_not_make_the_fit_certain():
    """32 validation eyes, all right and all confident: the unsmoothed fit goes to certainty (the degenerate
    calibration of session 7's benchmark, every probability 1.00); Laplace smoothing leaves doubt."""
    scores, labels = confidently_wrong(32, error_rate=0.0, seed=3)
    assert all(max(s, key=s.get) == truth for s, truth in zip(scores, labels))
    unsmoothed = fit_temperature(scores, labels, smooth=False)
    assert unsmoothed < 0.1
    for method in ("temperature", "temperature+uniform"):
        cal = calibrate(scores, labels, "error-free", method=method)
        top = [max(cal.apply(s).values()) for s in scores]
        assert max(top) < 0.995, (method, cal)


def test_ece_interval_brackets_the_ece():
    from training.calibration import ece_interval

    scores, labels = overconfident(n=300)
    low, high = ece_interval(scores, labels, draws=200)
    assert low < expected_calibration_error(scores, labels) < high and high - low > 0.01


def test_apply_keeps_the_ranking_and_sums_to_one():
    cal = Calibration(temperature=2.0)
    scores = {"AMD": 0.7, "Normal": 0.2, "Glaucoma": 0.1}
    out = cal.apply(scores)
    assert max(out, key=out.get) == "AMD" and out["AMD"] < 0.7 and sum(out.values()) == pytest.approx(1.0)
    assert cal.apply({}) == {}
    for bad in (0.0, -1.0, float("nan"), 1000.0):
        with pytest.raises(CalibrationError):
            Calibration(temperature=bad)
    mixed = Calibration(temperature=2.0, method="temperature+uniform", uniform=0.1).apply(scores)
    assert max(mixed, key=mixed.get) == "AMD" and sum(mixed.values()) == pytest.approx(1.0)
    assert min(mixed.values()) >= 0.1 / 3
    for bad in (
        {"method": "temperature+uniform", "uniform": 0.5},
        {"method": "temperature+uniform", "uniform": -0.1},
        {"method": "temperature", "uniform": 0.1},
        {"method": "platt"},
    ):
        with pytest.raises(CalibrationError):
            Calibration(temperature=2.0, **bad)


def test_calibration_stored_in_the_bundle_loaded_and_applied(tiny_bundle, tmp_path):
    """The language model decides here (the paper's configuration): its label scores are what is calibrated."""
    bundle = lm_decides(tiny_bundle, tmp_path / "calibrated")
    plain = Engine.from_bundle(bundle)
    cfp, volume = fundus_pixels(), oct_pixels()
    before = plain.analyze_images("R", cfp, volume)
    assert plain.calibration is None and not before.probabilities_calibrated and before.label_scores
    cal = Calibration(temperature=2.5, fitted_on="test", n=10, ece_before=0.2, ece_after=0.03)
    add_to_bundle(bundle, cal, version="0.0.1-test+cal")
    manifest = load_bundle(bundle).manifest
    assert manifest["calibration"]["file"] == CALIBRATION_FILE and CALIBRATION_FILE in manifest["files"]
    assert manifest["version"] == "0.0.1-test+cal"
    engine = Engine.from_bundle(bundle, min_label_probability=0.9)
    assert engine.calibration == cal and engine.operating_point == 0.9
    after = engine.analyze_images("R", cfp, volume)
    assert after.probabilities_calibrated and after.operating_point == 0.9
    expected = cal.apply(before.label_scores)
    assert after.label_scores == pytest.approx(expected)
    # The scores before calibration stay on the report (audit, calibration studies), tails and all.
    assert after.uncalibrated_scores == pytest.approx(before.label_scores, rel=1e-4)
    assert before.uncalibrated_scores == before.label_scores
    # The file is hashed like every other: a changed temperature is refused.
    path = bundle / CALIBRATION_FILE
    path.write_text(json.dumps({**cal.to_dict(), "temperature": 0.5}))
    with pytest.raises(BundleError, match="calibration.json"):
        load_bundle(bundle)


def test_training_cli_fits_on_the_validation_split_and_extends_the_bundle(tiny_bundle, tmp_path, capsys):
    """`python -m training.stage3.calibrate BUNDLE MANIFEST`: the engine on the val eyes, T fitted, bundle extended."""
    from training.stage3.calibrate import main

    manifest = _manifest(tmp_path, [("S0", "R", "val"), ("S1", "R", "val"), ("S2", "R", "val"), ("S3", "R", "train")])
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    assert main([str(bundle), str(manifest), "--version", "0.0.1-test+cal"]) == 0
    fitted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fitted["n"] == 3 and "val split" in fitted["fitted_on"]
    assert fitted["ece_after"] <= fitted["ece_before"] + 1e-9
    stored = load_bundle(bundle)
    assert stored.version == "0.0.1-test+cal" and stored.manifest["calibration"]["file"] == CALIBRATION_FILE
    assert Engine.from_bundle(bundle).calibration.temperature == pytest.approx(fitted["temperature"])
    assert fitted["method"] == "temperature+uniform"
    # The raw scores it was fitted on lie beside the bundle (outside it: the bundle's hashes stay as they are).
    fit_eyes = json.loads((tmp_path / "b.calibration_fit.json").read_text())["eyes"]
    assert [e["case"] for e in fit_eyes] == ["S0_R", "S1_R", "S2_R"] and len(fit_eyes[0]["scores"]) == 7
    # The pipeline's step fits on the first validation subjects only (each subject's eyes in one batch).
    from training.stage3.calibrate import calibrate_bundle

    again = calibrate_bundle(copy_bundle(tiny_bundle, tmp_path / "c"), manifest, "val", max_subjects=2)
    assert again.n == 2 and Engine.from_bundle(tmp_path / "c").calibration.n == 2


def _manifest(tmp_path, eyes: list[tuple[str, str, str]]):
    """A cohort manifest of (subject, eye, split) eyes with drawn images and unknown biomarkers."""
    import math

    from PIL import Image

    from grok_pacs.domain.biomarkers import BIOMARKERS
    from grok_pacs.domain.labels import Label
    from training.manifest import CohortRecord, write_manifest

    records = []
    for i, (subject, eye, split) in enumerate(eyes):
        eye_dir = tmp_path / "cohort" / subject / eye
        (eye_dir / "oct").mkdir(parents=True)
        Image.fromarray(fundus_pixels(seed=i)).save(eye_dir / "cfp.png")
        for k, frame in enumerate(oct_pixels(seed=i)):
            Image.fromarray(frame).save(eye_dir / "oct" / f"{k:03d}.png")
        label = [Label.GLAUCOMA, Label.NORMAL, Label.AMD][i % 3]
        nan = {b.key: math.nan for b in BIOMARKERS}
        records.append(
            CohortRecord(subject, eye, label, split, eye_dir / "cfp.png", eye_dir / "oct", nan, None, None, 0)
        )
    return write_manifest(tmp_path / "cohort" / "manifest.csv", records)


def test_evaluation_runs_both_eyes_of_a_subject_as_one_study(tiny_bundle, tmp_path):
    """The benchmark reads a subject's eyes together (one batched generation, as a study), in the order asked."""
    from training.stage3.evaluate import predict

    manifest = _manifest(tmp_path, [("S0", "R", "test"), ("S0", "L", "test"), ("S1", "R", "test")])
    cases = ["S1_R", "S0_L", "S0_R"]
    predictions, reports, _ = predict(Engine.from_bundle(tiny_bundle), manifest, cases, progress=False)
    assert [p.case_id for p in predictions] == cases
    assert [r.eye.value for r in reports] == ["R", "L", "R"]
    assert reports[1].timings_s["generate"] == reports[2].timings_s["generate"]  # S0's eyes: one generation
    assert reports[0].timings_s["generate"] != reports[1].timings_s["generate"]
    # Calibration only needs the scores: several subjects a generation, never a subject split across two.
    _, batched, _ = predict(Engine.from_bundle(tiny_bundle), manifest, cases, progress=False, batch_eyes=8)
    assert len({r.timings_s["generate"] for r in batched}) == 1
    assert [r.label for r in batched] == [r.label for r in reports]


def test_evaluation_batches_keep_subjects_whole():
    from training.stage3.evaluate import _batches

    subjects = [["A_R", "A_L"], ["B_R"], ["C_R", "C_L"], ["D_R", "D_L"], ["E_R", "E_L"]]
    assert _batches(subjects, 0) == subjects  # the runtime's way: one study a generation
    assert _batches(subjects, 4) == [["A_R", "A_L", "B_R"], ["C_R", "C_L", "D_R", "D_L"], ["E_R", "E_L"]]
