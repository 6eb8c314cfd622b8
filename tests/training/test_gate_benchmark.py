"""Issue 15's benchmark metrics (training.benchmark.safety) on known inputs, and the gate on degraded phantoms."""

from __future__ import annotations

import pytest

from grok_pacs.analysis.result import Action
from training.benchmark.safety import auroc, gate_benchmark, referral_metrics, sensitivity_at_specificity


def test_auroc_on_known_cases():
    assert auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    with pytest.raises(ValueError):
        auroc([0.1, 0.2], [True, True])


def test_sensitivity_at_specificity():
    scores = [0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.35, 0.9]
    positives = [False, False, False, False, True, True, True, True]
    sens, threshold = sensitivity_at_specificity(scores, positives, 0.95)
    assert sens == 0.75 and threshold == 0.6  # the positive at 0.35 sits below the negative at 0.4
    sens, _ = sensitivity_at_specificity([0.1, 0.9, 0.5, 0.2], [False, False, True, True], 0.95)
    assert sens == 0.0  # only a threshold above the negative 0.9 keeps every negative below it


def test_referral_metrics_count_retake_as_refer():
    actions = [Action.URGENT_REFERRAL, Action.RETAKE, Action.RESCREEN, Action.RESCREEN, Action.REFERRAL]
    out = referral_metrics(actions, [True, True, True, False, False])
    assert out["sensitivity"] == pytest.approx(2 / 3) and out["specificity"] == 0.5


def test_gate_separates_degraded_phantom_eyes():
    from training.benchmark.safety import phantom_eyes

    result = gate_benchmark(phantom_eyes(6, seed=1), seed=1)
    assert result["degraded_eyes_with_a_diagnosis"] == 0
    for modality in ("CFP", "OCT"):
        assert result[modality]["auroc"] >= 0.95 and result[modality]["gate_specificity"] == 1.0


def test_referral_and_calibration_figures_for_the_phantom_benchmark():
    from grok_pacs.report import dispositions
    from tests.analysis.test_calibration import overconfident
    from tests.helpers.ophthalmic_dicom import Patient, hand_built_report, make_cfp, make_oct
    from training.benchmark.safety import calibration_figures, referral_figures

    patient = Patient()
    eyes = [make_cfp(patient, "R"), make_oct(patient, "R")]
    served = [hand_built_report("R", eyes, label=label) for label in ("Normal", "Glaucoma", "Normal", "Diabetes")]
    served = dispositions.apply(served[:2]) + dispositions.apply(served[2:])
    base = {b.key: b.value for b in served[0].biomarkers}
    truth = ["Normal", "Glaucoma", "DiabeticRetinopathy", "Diabetes"]
    figures = referral_figures(served, truth, [base] * 4)
    assert figures["sensitivity"] == 0.5 and figures["specificity"] == 1.0  # the DR eye was called Normal
    assert figures["ungradable_with_diagnosis"] == 0
    scores, labels = overconfident(n=4000)
    out = calibration_figures(scores[:2000], labels[:2000], scores[2000:], labels[2000:])
    assert out["ece_after"] < 0.05 < out["ece_before"]
