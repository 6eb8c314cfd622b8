"""The linear-probe ceiling: how well a linear classifier on the 37 biomarkers names the label.

A multinomial logistic regression (numpy, full-batch gradient descent with L2, features standardised with
the training rows' statistics; missing values set to the training mean) fitted on one split and scored by
macro-F1 on another. Fitted on the cohort's measured biomarkers it bounds what the biomarkers say about the
label; fitted on the served estimates it bounds what the language model could read from its prompt. A
model far below the second figure is not using its inputs; one above it is reading the images too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from grok_pacs.domain.biomarkers import BIOMARKERS
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label
from training.benchmark.classification import classify

KEYS = [b.key for b in BIOMARKERS]


def _matrix(rows: Sequence[Mapping[str, float]]) -> np.ndarray:
    return np.array([[float(row.get(k, np.nan)) for k in KEYS] for row in rows], np.float64)


class SoftmaxProbe:
    """Multinomial logistic regression on standardised biomarkers; `fit` then `predict`."""

    def __init__(self, l2: float = 1e-2, steps: int = 2000, lr: float = 0.5) -> None:
        self.l2, self.steps, self.lr = l2, steps, lr

    def _standardise(self, x: np.ndarray) -> np.ndarray:
        x = np.where(np.isnan(x), self.mean, x)
        return (x - self.mean) / self.scale

    def fit(self, rows: Sequence[Mapping[str, float]], labels: Sequence[Label]) -> SoftmaxProbe:
        x = _matrix(rows)
        self.mean = np.nan_to_num(np.nanmean(x, axis=0))
        self.scale = np.nan_to_num(np.nanstd(x, axis=0), nan=1.0)
        self.scale[self.scale < 1e-9] = 1.0
        z = self._standardise(x)
        truth = np.array([DIAGNOSTIC_LABELS.index(label) for label in labels])
        onehot = np.eye(len(DIAGNOSTIC_LABELS))[truth]
        self.weight = np.zeros((z.shape[1], len(DIAGNOSTIC_LABELS)))
        self.bias = np.zeros(len(DIAGNOSTIC_LABELS))
        for _ in range(self.steps):
            grad = (self._probabilities(z) - onehot) / len(z)
            self.weight -= self.lr * (z.T @ grad + self.l2 * self.weight)
            self.bias -= self.lr * grad.sum(axis=0)
        return self

    def _probabilities(self, z: np.ndarray) -> np.ndarray:
        logits = z @ self.weight + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, rows: Sequence[Mapping[str, float]]) -> list[Label]:
        z = self._standardise(_matrix(rows))
        return [DIAGNOSTIC_LABELS[i] for i in self._probabilities(z).argmax(axis=1)]


def probe_macro_f1(
    train_rows: Sequence[Mapping[str, float]],
    train_labels: Sequence[Label],
    test_rows: Sequence[Mapping[str, float]],
    test_labels: Sequence[Label],
) -> dict[str, float]:
    """Fit on the first split, score on the second: macro-F1, accuracy and the sizes."""
    predicted = SoftmaxProbe().fit(train_rows, train_labels).predict(test_rows)
    result = classify(list(test_labels), predicted)
    return {
        "macro_f1": result.macro_f1,
        "accuracy": result.accuracy,
        "n_train": len(train_labels),
        "n_test": len(test_labels),
    }
