"""Fitting the biomarker pattern head (grok_pacs.model.pattern): the label from the 37 estimates, linearly.

Full-batch gradient descent with L2 on the softmax cross-entropy, features standardised with the training
rows' statistics (missing values set to the training mean). Stage 3 fits it on its training eyes'
estimates, the same numbers its prompts carry, and the benchmark's linear-probe ceiling is the same fit
(training.benchmark.probe), so the two figures are one model's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label
from grok_pacs.model.pattern import KEYS, PatternHead

DEFAULT_L2 = 1e-2  #: ridge strength on the standardised estimates (training.decision chooses its own)


def fit_pattern_head(
    rows: Sequence[Mapping[str, float]],
    labels: Sequence[Label],
    *,
    l2: float = DEFAULT_L2,
    steps: int = 2000,
    lr: float = 0.5,
) -> PatternHead:
    """The multinomial logistic regression of `labels` on `rows` (biomarker key -> value)."""
    if len(rows) != len(labels) or not rows:
        raise ValueError(f"need as many labels as rows (and at least one): {len(rows)} rows, {len(labels)} labels")
    x = np.array([[float(row.get(key, np.nan)) for key in KEYS] for row in rows], np.float64)
    mean = np.nan_to_num(np.nanmean(x, axis=0)) if not np.all(np.isnan(x)) else np.zeros(len(KEYS))
    scale = np.nan_to_num(np.nanstd(x, axis=0), nan=1.0)
    scale[scale < 1e-9] = 1.0
    z = (np.where(np.isnan(x), mean, x) - mean) / scale
    onehot = np.eye(len(DIAGNOSTIC_LABELS))[[DIAGNOSTIC_LABELS.index(Label(label)) for label in labels]]
    head = PatternHead(mean, scale, np.zeros((len(KEYS), len(DIAGNOSTIC_LABELS))), np.zeros(len(DIAGNOSTIC_LABELS)))
    for _ in range(steps):
        logits = z @ head.weight + head.bias
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        grad = (p / p.sum(axis=1, keepdims=True) - onehot) / len(z)
        head.weight[...] -= lr * (z.T @ grad + l2 * head.weight)
        head.bias[...] -= lr * grad.sum(axis=0)
    return head
