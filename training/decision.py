"""Fitting the decision classifier (grok_pacs.model.decision) and choosing its operating point.

- `subject_folds`: K folds of whole subjects (the two eyes of a subject never sit on both sides).
- `cross_fitted_labels`: each training row's label from a classifier fitted on the other folds only, so the
  label the language model reads in its training prompt is as often wrong as a served one.
- `fit_decision`: the multinomial logistic regression on the training eyes' cross-fitted estimates
  (training.stage3.crossfit makes them), its temperature fitted on the validation eyes' served estimates
  (training.calibration's Laplace-smoothed fit: an error-free validation split cannot make it certain), and
  the operating point chosen on the same validation eyes for a target error among stated labels.
- `choose_operating_point`: the least probability whose stated labels are wrong at most `target_error` of the
  time on the eyes given (the most coverage that meets the target); 1.0 (state nothing) when none does.

Nothing here looks at a test split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from grok_pacs.domain.labels import Label
from grok_pacs.model.decision import DecisionClassifier
from training.calibration import fit as fit_calibration
from training.pattern import fit_pattern_head

DEFAULT_TARGET_ERROR = 0.05  #: at most 5 % of the stated labels wrong (issue 32)
FOLDS = 5


def subject_folds(groups: Sequence[str], n_folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """Fold index per row; whole groups (subjects) per fold, groups dealt out in a seeded random order."""
    unique = sorted(set(groups))
    if len(unique) < 2:
        raise ValueError(f"cross-fitting needs at least 2 subjects, got {len(unique)}")
    n_folds = min(n_folds, len(unique))
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {unique[i]: rank % n_folds for rank, i in enumerate(order)}
    return np.array([fold_of[g] for g in groups])


def cross_fitted_labels(rows: Sequence[Mapping[str, float]], labels: Sequence[Label], folds: np.ndarray) -> list[Label]:
    """Each row's closest label by a classifier fitted on the rows of the other folds."""
    out: list[Label | None] = [None] * len(rows)
    for k in np.unique(folds):
        train = [i for i in range(len(rows)) if folds[i] != k]
        head = fit_pattern_head([rows[i] for i in train], [labels[i] for i in train])
        held = [i for i in range(len(rows)) if folds[i] == k]
        for i, p in zip(held, head.probabilities_batch([rows[i] for i in held])):
            out[i] = head.labels[int(p.argmax())]
    return [label for label in out if label is not None]


def choose_operating_point(
    confidence: Sequence[float], correct: Sequence[bool], target_error: float = DEFAULT_TARGET_ERROR
) -> float:
    """The least threshold t (one of the confidences) such that the eyes with confidence >= t are wrong at
    most `target_error` of the time; 1.0 when no threshold meets it (then no label is stated)."""
    c, ok = np.asarray(confidence, np.float64), np.asarray(correct, bool)
    if c.shape != ok.shape or not len(c):
        raise ValueError("choose_operating_point needs one correctness per confidence, and at least one")
    for t in np.unique(c):  # ascending: the first that meets the target covers the most eyes
        covered = c >= t
        if 1.0 - ok[covered].mean() <= target_error:
            return float(t)
    return 1.0


def risk_coverage(confidence: Sequence[float], correct: Sequence[bool]) -> list[dict[str, float]]:
    """For every distinct threshold (descending confidence): coverage and error among the covered eyes."""
    c, ok = np.asarray(confidence, np.float64), np.asarray(correct, bool)
    out = []
    for t in np.unique(c)[::-1]:
        covered = c >= t
        out.append({"threshold": float(t), "coverage": float(covered.mean()), "error": float(1.0 - ok[covered].mean())})
    return out


def fit_decision(
    train_rows: Sequence[Mapping[str, float]],
    train_labels: Sequence[Label],
    val_rows: Sequence[Mapping[str, float]],
    val_labels: Sequence[Label],
    *,
    target_error: float = DEFAULT_TARGET_ERROR,
    prompt_line: bool = True,
    provenance: Mapping[str, object] | None = None,
) -> DecisionClassifier:
    """The classifier on the training rows, its temperature and operating point on the validation rows."""
    if not val_rows or len(val_rows) != len(val_labels):
        raise ValueError(f"need validation rows with labels to calibrate: {len(val_rows)} rows, {len(val_labels)}")
    model = fit_pattern_head(train_rows, train_labels)
    raw = model.probabilities_batch(val_rows)
    names = [label.value for label in model.labels]
    truth = [Label(label).value for label in val_labels]
    temperature, _ = fit_calibration([dict(zip(names, map(float, p))) for p in raw], truth, "temperature")
    unscaled = DecisionClassifier(model, temperature=temperature, target_error=target_error, prompt_line=prompt_line)
    probs = unscaled.probabilities_batch(val_rows)
    confidence = probs.max(axis=1)
    correct = [names[int(i)] == t for i, t in zip(probs.argmax(axis=1), truth)]
    point = choose_operating_point(confidence, correct, target_error)
    stated = confidence >= point
    fitted_on = {
        "classifier": f"{len(train_rows)} training eyes, cross-fitted estimates",
        "temperature_and_operating_point": f"{len(val_rows)} validation eyes, served estimates",
        "val_accuracy": float(np.mean(correct)),
        "val_coverage": float(stated.mean()),
        "val_error_stated": float(1.0 - np.asarray(correct)[stated].mean()) if stated.any() else None,
        **dict(provenance or {}),
    }
    return DecisionClassifier(model, temperature, point, target_error, prompt_line, fitted_on)
