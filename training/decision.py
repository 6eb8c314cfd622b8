"""Fitting the decision classifier (grok_pacs.model.decision) and choosing its operating point.

- `subject_folds`: K folds of whole subjects (the two eyes of a subject never sit on both sides).
- `cross_fitted_labels`: each training row's label from a classifier fitted on the other folds only, so the
  label the language model reads in its training prompt is as often wrong as a served one.
- `choose_l2`: the ridge strength of the logistic regression, by subject-grouped cross-validated log loss on
  the training eyes (a fixed weak one made a nearly unregularised fit whose confidences sat at 0.99+, right
  or wrong); it returns each training eye's out-of-fold probabilities at that strength.
- `fit_decision`: the multinomial logistic regression on the training eyes' cross-fitted estimates
  (training.stage3.crossfit makes them); its temperature and operating point on the **calibration eyes**:
  the training eyes' out-of-fold probabilities together with the validation eyes' served ones (a few dozen
  validation eyes alone left the temperature and the 5 % point to two or three errors; the out-of-fold
  eyes multiply that by seven, and neither set was seen by the model that scores it). The temperature is
  training.calibration's Laplace-smoothed fit (an error-free set cannot make it certain); the figures on the
  validation eyes alone stay in `fitted_on` beside the pooled ones.
- `choose_operating_point`: the least probability whose stated labels are wrong at most `target_error` of the
  time on the eyes given (the most coverage that meets the target); 1.0 (state nothing) when none does.

Nothing here looks at a test split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label
from grok_pacs.model.decision import DecisionClassifier
from training.calibration import fit as fit_calibration
from training.pattern import DEFAULT_L2, fit_pattern_head

DEFAULT_TARGET_ERROR = 0.05  #: at most 5 % of the stated labels wrong (issue 32)
FOLDS = 5
#: Ridge strengths tried by `choose_l2` (on standardised estimates; 1e-2 was the fixed value before).
L2_GRID = (1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)


def subject_folds(groups: Sequence[str], n_folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """Fold index per row; whole groups (subjects) per fold, groups dealt out in a seeded random order."""
    unique = sorted(set(groups))
    if len(unique) < 2:
        raise ValueError(f"cross-fitting needs at least 2 subjects, got {len(unique)}")
    n_folds = min(n_folds, len(unique))
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {unique[i]: rank % n_folds for rank, i in enumerate(order)}
    return np.array([fold_of[g] for g in groups])


def cross_fitted_labels(
    rows: Sequence[Mapping[str, float]], labels: Sequence[Label], folds: np.ndarray, l2: float = DEFAULT_L2
) -> list[Label]:
    """Each row's closest label by a classifier fitted on the rows of the other folds."""
    return [DIAGNOSTIC_LABELS[int(i)] for i in out_of_fold_probabilities(rows, labels, folds, l2).argmax(axis=1)]


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


def out_of_fold_probabilities(
    rows: Sequence[Mapping[str, float]], labels: Sequence[Label], folds: np.ndarray, l2: float
) -> np.ndarray:
    """[N, 7] each row's label probabilities from a classifier (ridge `l2`) fitted on the other folds only."""
    out = np.zeros((len(rows), len(DIAGNOSTIC_LABELS)))
    for k in np.unique(folds):
        train = [i for i in range(len(rows)) if folds[i] != k]
        held = [i for i in range(len(rows)) if folds[i] == k]
        head = fit_pattern_head([rows[i] for i in train], [labels[i] for i in train], l2=l2)
        out[held] = head.probabilities_batch([rows[i] for i in held])
    return out


def choose_l2(
    rows: Sequence[Mapping[str, float]], labels: Sequence[Label], folds: np.ndarray, grid: Sequence[float] = L2_GRID
) -> tuple[float, np.ndarray, dict[str, float]]:
    """(the ridge strength of least cross-validated log loss, the rows' out-of-fold probabilities at it, the
    log loss of every strength tried)."""
    truth = np.array([DIAGNOSTIC_LABELS.index(Label(label)) for label in labels])
    losses, probs = {}, {}
    for l2 in grid:
        probs[l2] = out_of_fold_probabilities(rows, labels, folds, l2)
        losses[l2] = float(-np.mean(np.log(np.maximum(probs[l2][np.arange(len(truth)), truth], 1e-12))))
    best = min(grid, key=lambda l2: losses[l2])
    return best, probs[best], {f"{l2:g}": loss for l2, loss in losses.items()}


def _tempered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) row-wise: what the classifier's temperature does to probabilities it scored at T = 1."""
    z = np.log(np.maximum(probs, 1e-300)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _selective(probs: np.ndarray, truth: Sequence[str], names: Sequence[str], point: float) -> dict[str, float | None]:
    """Accuracy, coverage and error among stated labels of calibrated `probs` at the operating point."""
    confidence = probs.max(axis=1)
    correct = np.array([names[int(i)] == t for i, t in zip(probs.argmax(axis=1), truth)])
    stated = confidence >= point
    return {
        "accuracy": float(correct.mean()),
        "coverage": float(stated.mean()),
        "error_stated": float(1.0 - correct[stated].mean()) if stated.any() else None,
    }


def fit_decision(
    train_rows: Sequence[Mapping[str, float]],
    train_labels: Sequence[Label],
    val_rows: Sequence[Mapping[str, float]],
    val_labels: Sequence[Label],
    *,
    train_groups: Sequence[str] | None = None,
    target_error: float = DEFAULT_TARGET_ERROR,
    prompt_line: bool = True,
    provenance: Mapping[str, object] | None = None,
) -> DecisionClassifier:
    """The classifier on the training rows (its ridge strength by cross-validation over `train_groups`, each
    row its own subject when not given); its temperature and operating point on the calibration eyes (the
    training rows' out-of-fold probabilities and the validation rows')."""
    if not val_rows or len(val_rows) != len(val_labels):
        raise ValueError(f"need validation rows with labels to calibrate: {len(val_rows)} rows, {len(val_labels)}")
    groups = list(train_groups) if train_groups is not None else [str(i) for i in range(len(train_rows))]
    folds = subject_folds(groups, FOLDS)
    l2, oof, losses = choose_l2(train_rows, train_labels, folds)
    model = fit_pattern_head(train_rows, train_labels, l2=l2)
    names = [label.value for label in model.labels]
    raw = np.concatenate([oof, model.probabilities_batch(val_rows)])
    truth = [Label(label).value for label in [*train_labels, *val_labels]]
    temperature, _ = fit_calibration([dict(zip(names, map(float, p))) for p in raw], truth, "temperature")
    probs = _tempered(raw, temperature)
    correct = [names[int(i)] == t for i, t in zip(probs.argmax(axis=1), truth)]
    point = choose_operating_point(probs.max(axis=1), correct, target_error)
    pooled, val = _selective(probs, truth, names, point), _selective(probs[len(oof) :], truth[len(oof) :], names, point)
    fitted_on = {
        "classifier": f"{len(train_rows)} training eyes, cross-fitted estimates; ridge {l2:g} by "
        f"{len(np.unique(folds))}-fold subject-grouped cross-validation",
        "temperature_and_operating_point": f"{len(raw)} calibration eyes: {len(oof)} training eyes out of fold, "
        f"{len(val_rows)} validation eyes (served estimates)",
        "l2": l2,
        "cv_log_loss": losses,
        **{f"cal_{k}": v for k, v in pooled.items()},
        **{f"val_{k}": v for k, v in val.items()},
        **dict(provenance or {}),
    }
    return DecisionClassifier(model, temperature, point, target_error, prompt_line, fitted_on)
