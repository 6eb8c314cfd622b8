"""The figures that keep the phantom benchmark honest (issues 14 and 15), from served reports.

`safety_and_honesty` takes a bundle's engine, the cohort and the test eyes' served reports, reads the
validation eyes' estimates through the same engine's encoders and heads, and returns:
- text health: the share of test narratives that passed the validator (the rest were withheld) and the
  reasons they failed;
- the model's own grounding is in `training.benchmark.grounding` (the caller reports it as a headline);
- calibration of the language model's label scores: ECE on the test eyes before and after the temperature:
  the bundle's own (the pipeline fits it on validation subjects) or, for an uncalibrated bundle, one fitted
  here on the validation eyes' scores (the deciding classifier's calibration: training.benchmark.selective);
- referral: sensitivity/specificity of the test eyes' dispositions against those their truth calls for;
- linear-probe ceilings (`training.benchmark.probe`): on the measured biomarkers (train -> test), and on
  the served estimates (validation -> test: what the language model could read from its prompt).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from training.benchmark.probe import probe_macro_f1
from training.benchmark.safety import calibration_figures, referral_figures


def text_health(reports: Sequence) -> dict:
    """Share of narratives that passed the validator as served and at the first attempt (the rest passed at
    a retry, grok_pacs.analysis.rewrite), repeated sentences per report, distinct-2, and how often each
    failure reason occurred, first attempts included (over the reports the validator saw: gradable eyes)."""
    served = [r for r in reports if r.narrative_check is not None]
    checked = [r.narrative_check for r in served]
    firsts = [r.first_attempt or r.narrative_check for r in served]
    reasons = Counter(
        str(reason.value)
        for check in [*checked, *(r.first_attempt for r in served if r.first_attempt)]
        for reason in check.reasons
    )
    n = max(len(checked), 1)
    return {
        "n": len(reports),
        "validated": len(checked),
        "passed_share": sum(check.passed for check in checked) / n,
        "first_attempt_passed_share": sum(check.passed for check in firsts) / n,
        "retried": sum(r.first_attempt is not None for r in served),
        "repeated_sentences_per_report": sum(check.repeated_sentences for check in checked) / n,
        "distinct_2": sum(check.distinct_2 for check in checked) / n,
        "failure_reasons": dict(reasons.most_common()),
    }


def lm_scores(report) -> dict[str, float]:
    """The language model's label scores (calibrated when the bundle is): `lm_scores` when the decision
    classifier decided (its own probabilities are `label_scores`, scored in training.benchmark.selective)."""
    return report.lm_scores or report.label_scores


def _estimates(report) -> dict[str, float]:
    return {b.key: b.value for b in report.biomarkers}


def held_out_calibration(engine, val: Sequence, test_scores: list[dict], test_labels: list[str]) -> dict:
    """ECE on the test eyes before and after the calibration (with a 95 % bootstrap interval of the after):
    the bundle's own (fitted by the pipeline on validation subjects) when it has one, else one fitted here
    on the validation eyes."""
    from training.calibration import ece_interval, expected_calibration_error

    cal = engine.calibration
    if cal is None:
        val_reports = [engine.analyze_eye(r.eye, cfp=r.cfp_path, oct=r.oct_path) for r in val]
        return calibration_figures(
            [lm_scores(r) for r in val_reports], [r.label.value for r in val], test_scores, test_labels
        )
    return {
        "method": cal.method,
        "temperature": cal.temperature,
        "uniform": cal.uniform,
        "n_val": cal.n,
        "fitted_on": cal.fitted_on,
        "n_test": len(test_labels),
        "ece_before": expected_calibration_error([cal.invert(s) for s in test_scores], test_labels),
        "ece_after": expected_calibration_error(test_scores, test_labels),
        "ece_after_ci95": ece_interval(test_scores, test_labels),
        "test_mean_confidence": sum(max(s.values()) for s in test_scores) / len(test_scores),
    }


def safety_and_honesty(engine, manifest: Path, test_ids: Sequence[str], test_reports: Sequence) -> dict:
    """The figures of the module docstring for one bundle (its engine) on the cohort `manifest`."""
    from grok_pacs.analysis.imaging import read_cfp, read_oct_volume
    from training.manifest import load_manifest
    from training.stage3.features import eye_id

    records = {eye_id(r.subject_id, r.eye): r for r in load_manifest(manifest)}
    test = [records[case] for case in test_ids]
    val = [r for r in records.values() if r.split == "val"]
    train = [r for r in records.values() if r.split == "train"]
    val_estimates = [engine.biomarker_estimates(read_cfp(r.cfp_path), read_oct_volume(r.oct_path)) for r in val]
    test_labels = [r.label for r in test]
    return {
        "text_health": text_health(test_reports),
        "calibration": held_out_calibration(
            engine, val, [lm_scores(r) for r in test_reports], [label.value for label in test_labels]
        ),
        "referral": referral_figures(test_reports, [r.label.value for r in test], [r.biomarkers for r in test]),
        "probe_ceiling_measured": probe_macro_f1(
            [r.biomarkers for r in train], [r.label for r in train], [r.biomarkers for r in test], test_labels
        ),
        "probe_ceiling_estimates": probe_macro_f1(
            val_estimates,
            [r.label for r in val],
            [_estimates(r) for r in test_reports],
            test_labels,
        ),
    }
