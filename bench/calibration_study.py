"""Calibration study, from stored scores (no model run): the raw label scores of the validation eyes the bundle
step calibrated on (`<bundle>.calibration_fit.json`) and of the test eyes (`per_eye[].raw_label_scores` in
bench/results/phantom.json). Each calibration method is fitted on the validation eyes (plain cross-entropy or
Laplace-smoothed targets; temperature alone or with a uniform share) and judged on the test eyes: ECE with a
95 % bootstrap interval, mean confidence against accuracy.

    python -m bench.calibration_study [PHANTOM_JSON]   # writes bench/results/calibration_study_phantom.json
"""

import json
import sys
from pathlib import Path

import numpy as np

from grok_pacs.analysis.label_calibration import Calibration
from training.calibration import METHODS, ece_interval, expected_calibration_error, fit

RESULTS = Path(__file__).resolve().parent / "results"


def _load(phantom_json: Path) -> tuple[list, list, list, list]:
    variant = next(iter(json.loads(phantom_json.read_text())["variants"].values()))
    fit_file = Path(variant["bundle"] + ".calibration_fit.json")
    val = json.loads(fit_file.read_text())["eyes"]
    test = variant["per_eye"]
    return (
        [e["scores"] for e in val],
        [e["truth"] for e in val],
        [e["raw_label_scores"] for e in test],
        [e["truth"] for e in test],
    )


def main() -> int:
    phantom_json = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "phantom.json"
    val_scores, val_labels, test_scores, test_labels = _load(phantom_json)
    accuracy = float(np.mean([max(s, key=s.get) == t for s, t in zip(test_scores, test_labels)]))
    out = {
        "source": str(phantom_json.name),
        "n_val": len(val_labels),
        "val_errors": sum(max(s, key=s.get) != t for s, t in zip(val_scores, val_labels)),
        "n_test": len(test_labels),
        "test_accuracy": accuracy,
        "test_ece_raw": expected_calibration_error(test_scores, test_labels),
        "fits": [],
    }
    for method in METHODS:
        for smooth in (False, True):
            temperature, uniform = fit(val_scores, val_labels, method, smooth)
            cal = Calibration(temperature=temperature, method=method, uniform=uniform)
            calibrated = [cal.apply(s) for s in test_scores]
            out["fits"].append(
                {
                    "method": method,
                    "smoothed_targets": smooth,
                    "temperature": temperature,
                    "uniform": uniform,
                    "test_ece": expected_calibration_error(calibrated, test_labels),
                    "test_ece_ci95": ece_interval(calibrated, test_labels),
                    "test_mean_confidence": float(np.mean([max(p.values()) for p in calibrated])),
                }
            )
    (RESULTS / "calibration_study_phantom.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
