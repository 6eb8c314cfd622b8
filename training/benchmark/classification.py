"""Diagnosis classification (docs/domain.md, Evaluation, task 1): confusion matrix, per-label P/R/F1, macro-F1.

Rows are the 7 reference labels (`DIAGNOSTIC_LABELS` order); columns are the same 7 plus
`Indeterminate`, so a prediction that names no valid label is visible and counts as wrong for its row.
Macro-F1 averages F1 over the labels that occur in the references or the predictions (as scikit-learn's
`f1_score(average="macro")` does over the labels present); `Indeterminate` is never one of them.
An ill-defined precision or recall (nothing predicted / nothing to find) counts as 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label

ROWS: tuple[Label, ...] = DIAGNOSTIC_LABELS
COLUMNS: tuple[Label, ...] = (*DIAGNOSTIC_LABELS, Label.INDETERMINATE)


@dataclass(frozen=True)
class LabelScores:
    label: str
    precision: float
    recall: float
    f1: float
    support: int  #: reference cases with this label
    predicted: int  #: predictions of this label


@dataclass(frozen=True)
class ClassificationResult:
    confusion: list[list[int]]  #: [row = reference label][column = predicted label, + Indeterminate]
    per_label: list[LabelScores]  #: in DIAGNOSTIC_LABELS order
    macro_f1: float
    accuracy: float
    indeterminate: int  #: predictions that named no valid label
    n: int

    def to_dict(self) -> dict:
        return {
            "rows": [label.value for label in ROWS],
            "columns": [label.value for label in COLUMNS],
            "confusion": self.confusion,
            "per_label": [vars(scores) for scores in self.per_label],
            "macro_f1": self.macro_f1,
            "accuracy": self.accuracy,
            "indeterminate": self.indeterminate,
            "n": self.n,
        }


def confusion_matrix(truth: Sequence[Label], predicted: Sequence[Label]) -> list[list[int]]:
    """Counts [reference row][predicted column] over ROWS x COLUMNS."""
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} reference labels but {len(predicted)} predictions")
    matrix = [[0] * len(COLUMNS) for _ in ROWS]
    for true, pred in zip(truth, predicted):
        if true not in ROWS:
            raise ValueError(f"reference label {true!r} is not one of the 7 diagnostic labels")
        matrix[ROWS.index(Label(true))][COLUMNS.index(Label(pred))] += 1
    return matrix


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def label_scores(matrix: list[list[int]]) -> list[LabelScores]:
    """Precision, recall and F1 of every diagnostic label from a ROWS x COLUMNS confusion matrix."""
    scores = []
    for i, label in enumerate(ROWS):
        tp = matrix[i][i]
        support = sum(matrix[i])
        predicted = sum(row[i] for row in matrix)
        precision, recall = _ratio(tp, predicted), _ratio(tp, support)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores.append(LabelScores(label.value, precision, recall, f1, support, predicted))
    return scores


def classify(truth: Sequence[Label], predicted: Sequence[Label]) -> ClassificationResult:
    """All classification metrics for paired reference and predicted labels."""
    matrix = confusion_matrix(truth, predicted)
    per_label = label_scores(matrix)
    present = [s for s in per_label if s.support or s.predicted]
    n = len(truth)
    return ClassificationResult(
        confusion=matrix,
        per_label=per_label,
        macro_f1=sum(s.f1 for s in present) / len(present) if present else 0.0,
        accuracy=_ratio(sum(matrix[i][i] for i in range(len(ROWS))), n),
        indeterminate=sum(row[-1] for row in matrix),
        n=n,
    )


def plot_confusion(result: ClassificationResult, path: Path, title: str) -> Path:
    """Draw the confusion matrix (counts, row-normalised shading) to a PNG at `path`.

    Uses a bare `Figure` (no pyplot): no global backend state, safe in scripts and threads.
    """
    from matplotlib.figure import Figure

    shade = [[count / max(1, sum(row)) for count in row] for row in result.confusion]
    fig = Figure(figsize=(8.5, 6.5))
    ax = fig.subplots()
    ax.imshow(shade, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(COLUMNS)), [c.value for c in COLUMNS], rotation=40, ha="right")
    ax.set_yticks(range(len(ROWS)), [r.value for r in ROWS])
    for i, row in enumerate(result.confusion):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if shade[i][j] > 0.5 else "black")
    ax.axvline(len(ROWS) - 0.5, color="grey", linewidth=1.0)  # Indeterminate: no valid label named
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(f"{title}\nmacro-F1 {result.macro_f1:.3f}, n={result.n}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
