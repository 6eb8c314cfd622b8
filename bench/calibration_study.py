"""Calibration study on the validation eyes only, from stored scores (no model run).

The raw label scores of the validation eyes the bundle step calibrated on (`<bundle>.calibration_fit.json`,
found through the bundle named in bench/results/phantom.json) are split into 5 folds of whole subjects;
each calibration method (plain cross-entropy or Laplace-smoothed targets; temperature alone or with a
uniform share) is fitted on 4 folds and judged on the fifth, pooled over the folds: ECE with a 95 %
bootstrap interval, mean confidence against accuracy. The test eyes are never read: a method chosen here
is chosen on validation (issue 32; an earlier version ranked the methods on the benchmark's test eyes).

    python -m bench.calibration_study [PHANTOM_JSON]   # writes bench/results/calibration_study_phantom.json
"""

import json
import sys
from pathlib import Path

import numpy as np

from grok_pacs.analysis.label_calibration import Calibration
from training.calibration import METHODS, ece_interval, expected_calibration_error, fit
from training.decision import subject_folds

RESULTS = Path(__file__).resolve().parent / "results"


def _load(phantom_json: Path) -> tuple[list, list, list]:
    """(raw scores, true labels, subject ids) of the validation eyes the bundle was calibrated on."""
    variant = next(iter(json.loads(phantom_json.read_text())["variants"].values()))
    fit_file = Path(variant["bundle"] + ".calibration_fit.json")
    val = json.loads(fit_file.read_text())["eyes"]
    return [e["scores"] for e in val], [e["truth"] for e in val], [e["case"].rsplit("_", 1)[0] for e in val]


def _cross_validated(scores: list, labels: list, folds: np.ndarray, method: str, smooth: bool) -> list:
    """Each eye's calibrated scores from a calibration fitted on the other folds."""
    out: list = [None] * len(labels)
    for k in np.unique(folds):
        train = [i for i in range(len(labels)) if folds[i] != k]
        temperature, uniform = fit([scores[i] for i in train], [labels[i] for i in train], method, smooth)
        cal = Calibration(temperature=temperature, method=method, uniform=uniform)
        for i in np.flatnonzero(folds == k):
            out[i] = cal.apply(scores[i])
    return out


def main() -> int:
    phantom_json = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "phantom.json"
    scores, labels, subjects = _load(phantom_json)
    folds = subject_folds(subjects)
    out = {
        "source": str(phantom_json.name),
        "protocol": "5-fold cross-validation over the validation subjects; no test eye is read",
        "n_val": len(labels),
        "val_errors": sum(max(s, key=s.get) != t for s, t in zip(scores, labels)),
        "val_ece_raw": expected_calibration_error(scores, labels),
        "fits": [],
    }
    for method in METHODS:
        for smooth in (False, True):
            calibrated = _cross_validated(scores, labels, folds, method, smooth)
            out["fits"].append(
                {
                    "method": method,
                    "smoothed_targets": smooth,
                    "val_cv_ece": expected_calibration_error(calibrated, labels),
                    "val_cv_ece_ci95": ece_interval(calibrated, labels),
                    "val_cv_mean_confidence": float(np.mean([max(p.values()) for p in calibrated])),
                }
            )
    (RESULTS / "calibration_study_phantom.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
