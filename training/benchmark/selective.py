"""Selective prediction: does the stated confidence rank the deciding component's own errors?

From the served reports of held-out eyes and their true labels:
- each eye's decided label and confidence: the best label of `Report.label_scores` (the deciding
  component's calibrated probabilities: the decision classifier's, or the language model's) and its
  probability; right when it is the true label;
- the risk-coverage curve (every distinct threshold: the share of eyes at or above it and the error among
  them), as a table and a PNG;
- AUROC of the confidence for right against wrong eyes (0.5: it ranks nothing);
- ECE of the calibrated probabilities, with a 95 % bootstrap interval, and the number of distinct
  confidence values (a constant confidence has ECE |accuracy - constant| and ranks nothing);
- at the operating point the runtime used: coverage (the share of eyes that state a label, which also
  leaves out eyes whose findings concluded another label) and the error among the stated labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.benchmark.safety import auroc
from training.calibration import ece_interval, expected_calibration_error
from training.decision import risk_coverage


def decided(report) -> tuple[str | None, float | None]:
    """(the deciding component's best label, its probability) of one report; (None, None) without scores."""
    scores = report.label_scores or {}
    if not scores:
        return None, None
    best = max(scores, key=scores.get)
    return best, float(scores[best])


def selective_figures(reports: Sequence, truth: Sequence[str], plot: Path | None = None) -> dict:
    """The figures of the module docstring for reports with scores (the others are counted, not scored)."""
    scored = [(r, t) for r, t in zip(reports, truth, strict=True) if r.label_scores]
    if not scored:
        return {"n": len(reports), "n_scored": 0}
    labels = [decided(r)[0] for r, _ in scored]
    confidence = np.array([decided(r)[1] for r, _ in scored])
    correct = np.array([label == t for label, (_, t) in zip(labels, scored)])
    stated = np.array([r.label.value != "Indeterminate" for r, _ in scored])
    right_stated = np.array([r.label.value == t for r, t in scored])[stated]
    scores = [dict(r.label_scores) for r, _ in scored]
    truths = [t for _, t in scored]
    curve = risk_coverage(confidence, correct)
    figures = {
        "n": len(reports),
        "n_scored": len(scored),
        "decided_by": sorted({getattr(r, "decided_by", "") for r, _ in scored}),
        "accuracy_decided": float(correct.mean()),
        "operating_point": scored[0][0].operating_point,
        "coverage": float(stated.mean()),
        "n_stated": int(stated.sum()),
        "error_stated": float(1.0 - right_stated.mean()) if stated.any() else None,
        "auroc_right_vs_wrong": auroc(confidence, correct) if 0 < correct.sum() < len(correct) else None,
        "ece": expected_calibration_error(scores, truths),
        "ece_ci95": ece_interval(scores, truths),
        "distinct_confidences": int(len(np.unique(np.round(confidence, 6)))),
        "risk_coverage": curve,
    }
    if plot is not None:
        plot_risk_coverage(curve, figures, plot)
        figures["plot"] = str(plot)
    return figures


def plot_risk_coverage(curve: list[dict], figures: dict, path: Path) -> Path:
    """Error among the covered eyes against coverage, the operating point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.step([p["coverage"] for p in curve], [p["error"] for p in curve], where="post", label="risk-coverage")
    if figures.get("error_stated") is not None:
        ax.scatter([figures["coverage"]], [figures["error_stated"]], color="red", zorder=3, label="operating point")
    ax.set(xlabel="coverage (share of eyes stated)", ylabel="error among stated labels", xlim=(0, 1.02))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curve_table(curve: list[dict], rows: int = 12) -> str:
    """The risk-coverage curve as a Markdown table, thinned to about `rows` rows (the ends kept)."""
    step = max(1, len(curve) // rows)
    picked = curve[::step] + ([curve[-1]] if (len(curve) - 1) % step else [])
    lines = ["| threshold | coverage | error among covered |", "|---|---|---|"]
    lines += [f"| {p['threshold']:.3f} | {p['coverage']:.3f} | {p['error']:.3f} |" for p in picked]
    return "\n".join(lines)
