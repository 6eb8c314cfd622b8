"""The linear-probe ceiling: how well a linear classifier on the 37 biomarkers names the label.

The pattern head's fit (training.pattern: a multinomial logistic regression on the standardised
biomarkers), fitted on one split and scored by macro-F1 on another. Fitted on the cohort's measured
biomarkers it bounds what the biomarkers say about the label; fitted on the served estimates it bounds what
the language model could read from its prompt. A model far below the second figure is not using its inputs;
one above it is reading the images too. It is NOT what the bundle's decision classifier scores: that one
is fitted on the training eyes' cross-fitted estimates (training.stage3.crossfit), this on the validation
eyes' served estimates; the benchmark scores the classifier through the served reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label
from training.benchmark.classification import classify
from training.pattern import fit_pattern_head


def probe_macro_f1(
    train_rows: Sequence[Mapping[str, float]],
    train_labels: Sequence[Label],
    test_rows: Sequence[Mapping[str, float]],
    test_labels: Sequence[Label],
) -> dict[str, float]:
    """Fit on the first split, score on the second: macro-F1, accuracy and the sizes."""
    head = fit_pattern_head(train_rows, train_labels)
    predicted = [DIAGNOSTIC_LABELS[i] for i in head.probabilities_batch(test_rows).argmax(axis=1)]
    result = classify(list(test_labels), predicted)
    return {
        "macro_f1": result.macro_f1,
        "accuracy": result.accuracy,
        "n_train": len(train_labels),
        "n_test": len(test_labels),
    }
