"""The decision classifier alone on a pipeline's held-out test eyes: what it decides before the language model.

Reads a finished (or running) stage-3 folder of the pipeline cache: its `decision.json` (fitted on the
training eyes' cross-fitted estimates, temperature and operating point on the validation eyes) and its
encoder feature store, computes the served heads' estimates of the test eyes, and scores the classifier's
calibrated decisions: macro-F1 of its label, and the selective-prediction figures
(training.benchmark.selective: coverage and error among stated labels at the operating point, AUROC right
vs wrong, ECE with its interval, distinct confidence values, risk-coverage PNG). The runtime also leaves an
eye Indeterminate when the language model's findings conclude another label: `bench.phantom` measures that,
through the served reports. Nothing here is tuned: the classifier is read as the bundle will carry it.

    python -m bench.decision_classifier STAGE3_DIR STAGE2_DIR MANIFEST OUT_JSON
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from grok_pacs.domain.labels import Label
from grok_pacs.model.decision import DECISION_FILE, DecisionClassifier
from training.benchmark.classification import classify
from training.benchmark.selective import selective_figures
from training.manifest import load_manifest
from training.stage3.decide import head_estimates
from training.stage3.features import FeatureStore, eye_id


@dataclass(frozen=True)
class _Decided:
    """What selective_figures reads of a report: the classifier's probabilities and what would be stated."""

    label_scores: dict
    label: Label
    operating_point: float
    decided_by: str = "decision classifier"


def main(stage3_dir: Path, stage2_dir: Path, manifest: Path, out: Path) -> dict:
    classifier = DecisionClassifier.load(stage3_dir / DECISION_FILE)
    store = FeatureStore.load(next((stage3_dir / "features").glob("features-*.safetensors")))
    estimates = head_estimates(
        store, stage2_dir / "cfp" / "cfp-head.safetensors", stage2_dir / "oct" / "oct-head.safetensors"
    )
    test = [r for r in load_manifest(manifest) if r.split == "test"]
    decided = []
    for record in test:
        decision = classifier.decide(estimates[eye_id(record.subject_id, record.eye)])
        stated = decision.label if classifier.states(decision) else Label.INDETERMINATE
        decided.append(_Decided(decision.probabilities, stated, classifier.operating_point))
    truth = [r.label.value for r in test]
    labels = [Label(max(d.label_scores, key=d.label_scores.get)) for d in decided]
    figures = selective_figures(decided, truth, out.with_suffix(".png"))
    result = {
        "note": "the decision classifier alone (no language model) on the test eyes, as the bundle carries it",
        "stage3": str(stage3_dir),
        "manifest": str(manifest),
        "n_test_eyes": len(test),
        "macro_f1": classify([r.label for r in test], labels).macro_f1,
        "classifier": {k: v for k, v in classifier.to_dict().items() if k != "model"},
        "selective": figures,
    }
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


if __name__ == "__main__":
    summary = main(*(Path(arg) for arg in sys.argv[1:5]))
    print(json.dumps({k: v for k, v in summary.items() if k != "selective"}, indent=1, default=str))
    print(json.dumps({k: v for k, v in summary["selective"].items() if k != "risk_coverage"}, indent=1))
