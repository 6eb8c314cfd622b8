"""Cross-fitted (out-of-fold) biomarker estimates of the training eyes, and the decision classifier fitted on them.

The served heads were fitted on every training eye, so their estimates of a training eye are in-sample:
a classifier fitted on them learns from estimates far better than any served one (the old pattern head
named the label of 100 % of the training eyes and 94.6 % of the held-out ones), and the language model
never saw its prompt line wrong. Here each training eye's estimates come from ridge heads refitted, by the
stage-2 procedure (`training.stage2.probe.fit_ridge`: the same head input, alphas chosen per biomarker by
subject-grouped cross-validation), on the other K-1 folds of subjects: no training row is estimated by a
head that saw it.

Why K-fold ridge refits on frozen stage-2 features, not K stage-2 trainings: a ridge refit is one SVD per
fold and alpha path (seconds on 2 cores for 300 eyes); retraining the encoder K times is K x stage 2
(minutes each). What that leaves: the encoders themselves were aligned on every training eye, so the
features of a training eye are still in-sample for the encoder, and the cross-fitted errors are somewhat
smaller than served ones (the log line compares them). The classifier's ridge strength is chosen by
cross-validation on these rows; its temperature and operating point are fitted on the training rows'
out-of-fold probabilities together with the validation eyes' served estimates (training.decision).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from grok_pacs.domain.biomarkers import CFP_KEYS, OCT_KEYS
from grok_pacs.domain.labels import Label
from grok_pacs.model.decision import DecisionClassifier
from grok_pacs.model.heads import BiomarkerHead, estimates_in_range, head_input
from training.decision import FOLDS, cross_fitted_labels, fit_decision, subject_folds
from training.stage2.probe import fit_ridge
from training.stage3.features import FeatureStore

log = logging.getLogger(__name__)

#: The stage-2 default grid of ridge strengths (training.stage2.config.Stage2Config.ridge_alphas).
ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)


def head_inputs(store: FeatureStore, rows: Sequence[int], modality: str, grid: int, chunk: int = 256) -> np.ndarray:
    """[N, F] what a head with `grid` reads for the given store rows of one modality."""
    pooled = store.cfp_pooled if modality == "CFP" else store.oct_pooled
    tokens = store.cfp if modality == "CFP" else store.oct
    index = list(rows)
    parts = [
        head_input(pooled[index[i : i + chunk]], tokens[index[i : i + chunk]].float() if grid else None, grid)
        for i in range(0, len(index), chunk)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, 0))


def out_of_fold(
    features: np.ndarray, targets: np.ndarray, keys: tuple[str, ...], groups: Sequence[str], folds: np.ndarray
) -> np.ndarray:
    """[N, K] estimates, each row predicted by a ridge fitted on the rows of the other folds only."""
    out = np.full(targets.shape, np.nan)
    for k in np.unique(folds):
        train, held = folds != k, folds == k
        probe = fit_ridge(features[train], targets[train], keys, np.asarray(groups)[train], ALPHAS, seed=int(k))
        out[held] = probe.predict(features[held])
    return out


def cross_fitted_estimates(
    store: FeatureStore,
    ids: Sequence[str],
    targets: Mapping[str, Mapping[str, float]],
    groups: Sequence[str],
    heads: Mapping[str, Path],
    *,
    n_folds: int = FOLDS,
    seed: int = 0,
) -> tuple[dict[str, dict[str, float]], np.ndarray]:
    """Out-of-fold estimates of the eyes `ids` (their measured `targets`, subject `groups`), clipped to the
    plausible ranges as served; and each eye's fold."""
    folds = subject_folds(list(groups), n_folds, seed)
    rows = [store.row(i) for i in ids]
    values = {i: {} for i in ids}
    for modality, keys in (("OCT", OCT_KEYS), ("CFP", CFP_KEYS)):
        grid = BiomarkerHead.load(heads[modality]).grid
        x = head_inputs(store, rows, modality, grid)
        y = np.array([[float(targets[i].get(key, np.nan)) for key in keys] for i in ids], np.float64)
        predicted = out_of_fold(x, y, keys, groups, folds)
        for i, row in zip(ids, predicted):
            values[i].update(zip(keys, map(float, row)))
    return {i: estimates_in_range(v) for i, v in values.items()}, folds


def fit_decision_classifier(
    train: Sequence[tuple[str, str, Label]],
    val: Sequence[tuple[str, Label]],
    served: Mapping[str, Mapping[str, float]],
    store: FeatureStore,
    targets: Mapping[str, Mapping[str, float]],
    heads: Mapping[str, Path],
    *,
    target_error: float,
    seed: int = 0,
) -> tuple[DecisionClassifier, dict[str, dict[str, float]], dict[str, Label]]:
    """The decision classifier (see the module docstring), the training eyes' cross-fitted estimates, and
    each training eye's cross-fitted decided label (what its SFT prompt line says).

    `train`: (eye id, subject id, label) of every training eye; `val`: (eye id, label); `served`: every
    eye's estimates from the served heads."""
    ids = [i for i, _, _ in train]
    oof, folds = cross_fitted_estimates(store, ids, targets, [s for _, s, _ in train], heads, seed=seed)
    labels = [label for _, _, label in train]
    rows = [oof[i] for i in ids]
    decided = dict(zip(ids, cross_fitted_labels(rows, labels, folds)))
    right = sum(decided[i] == label for i, label in zip(ids, labels))
    classifier = fit_decision(
        rows,
        labels,
        [served[i] for i, _ in val],
        [label for _, label in val],
        train_groups=[s for _, s, _ in train],
        target_error=target_error,
        provenance={"folds": int(len(np.unique(folds))), "train_cross_fitted_accuracy": right / len(ids)},
    )
    log.info(
        "stage 3: decision classifier: ridge %g; cross-fitted training accuracy %.3f; validation accuracy %.3f, "
        "T %.3f, operating point %.3f (coverage %.2f on validation)",
        classifier.fitted_on["l2"],
        right / len(ids),
        classifier.fitted_on["val_accuracy"],
        classifier.temperature,
        classifier.operating_point,
        classifier.fitted_on["val_coverage"],
    )
    return classifier, oof, decided
