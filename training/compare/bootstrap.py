"""Paired bootstrap of two bundles' figures over the same eyes, and the promotion rule.

Each bundle's served reports are reduced to per-eye `Outcomes` (arrays in eye order). A resample draws eye
indices with replacement and computes every figure of BOTH bundles on the SAME indices, so the interval of
the difference (candidate - serving) is the paired one: the eyes' own difficulty cancels. Figures follow the
benchmark's definitions (`training.benchmark.classification`, `training.calibration`,
`training.benchmark.safety`, `training.benchmark.honesty`, `training.benchmark.grounding`), vectorised over
the resamples so that 1000 of them take well under a second on a few hundred eyes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.benchmark.classification import COLUMNS, ROWS

K, C = len(ROWS), len(COLUMNS)  #: reference labels; predicted columns (+ Indeterminate)
ECE_BINS = 15  #: as training.calibration.expected_calibration_error
MACRO_F1_MARGIN = 0.01  #: how much macro-F1 a candidate may lose (lower bound of the paired difference)
#: Figures a candidate must not be worse on beyond their interval (higher is better for each).
SAFETY_FIGURES = ("validator_pass_rate", "grounding_agreement", "referral_sensitivity")
RULE = (
    "promote when the lower bound of the {level:.0%} paired-bootstrap interval of macro-F1 (candidate - serving) "
    "is >= -{margin} and no safety figure ({safety}) is worse beyond its interval (the upper bound of its paired "
    "difference is below 0); {resamples} resamples of the same eye indices for both bundles, seed {seed}"
)


@dataclass(frozen=True)
class Outcomes:
    """One bundle's per-eye results, in eye order (the two bundles' arrays must be of the same eyes)."""

    truth: np.ndarray  #: int, index into ROWS
    predicted: np.ndarray  #: int, index into COLUMNS (K = Indeterminate)
    confidence: np.ndarray  #: top label probability as served; NaN where the engine gave no scores
    top_correct: np.ndarray  #: bool, the top-scored label is the reference label
    refer_predicted: np.ndarray  #: bool, served disposition is a referral (urgent, routine or retake)
    refer_truth: np.ndarray  #: bool, the disposition the eye's truth calls for is a referral
    validated: np.ndarray  #: bool, the validator saw a narrative (gradable eyes)
    passed: np.ndarray  #: bool, it passed (withheld otherwise)
    repeats: np.ndarray  #: float, repeated sentences in the narrative (0 where not validated)
    n_cited: np.ndarray  #: int, numbers the report cites
    n_agree: np.ndarray  #: int, of which agree with the SR's estimates
    bleu4: np.ndarray  #: sentence BLEU-4 against the reference report
    rouge_l: np.ndarray
    rubric_total: np.ndarray  #: judge-free rubric total (max 50)

    @property
    def n(self) -> int:
        return len(self.truth)


def _sums(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Per resample: the sum of values over its drawn eyes (idx is resamples x eyes)."""
    return values.astype(np.float64)[idx].sum(axis=1)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def _confusion(o: Outcomes, idx: np.ndarray) -> np.ndarray:
    """Resamples x K x C confusion counts (bincount with one offset per resample)."""
    codes = (o.truth * C + o.predicted)[idx] + (np.arange(len(idx)) * K * C)[:, None]
    return np.bincount(codes.ravel(), minlength=len(idx) * K * C).reshape(len(idx), K, C)


def _classification(o: Outcomes, idx: np.ndarray) -> dict[str, np.ndarray]:
    m = _confusion(o, idx)
    tp = np.diagonal(m[:, :, :K], axis1=1, axis2=2)
    support, predicted = m.sum(axis=2), m[:, :, :K].sum(axis=1)
    f1 = np.nan_to_num(_ratio(2.0 * tp, (support + predicted).astype(np.float64)))  # 2PR/(P+R); 0 if ill-defined
    present = (support + predicted) > 0
    out = {
        "macro_f1": (f1 * present).sum(axis=1) / np.maximum(present.sum(axis=1), 1),
        "accuracy": tp.sum(axis=1) / idx.shape[1],
        "indeterminate_share": m[:, :, K].sum(axis=1) / idx.shape[1],
    }
    # A label absent from a resample's references and predictions has no F1 (left out of macro-F1 too).
    out.update({f"f1_{label.value}": np.where(present[:, i], f1[:, i], np.nan) for i, label in enumerate(ROWS)})
    return out


def _ece(o: Outcomes, idx: np.ndarray) -> np.ndarray:
    """ECE of the top label, 15 equal-width bins: sum over bins of |correct - confidence| / eyes."""
    conf = np.nan_to_num(o.confidence, nan=0.0)[idx]
    scored = (~np.isnan(o.confidence))[idx]
    bins = np.clip(np.ceil(conf * ECE_BINS).astype(int) - 1, -1, ECE_BINS - 1)  # (low, high]; 0 in no bin
    keep = scored & (bins >= 0)
    codes = np.where(keep, bins + (np.arange(len(idx)) * ECE_BINS)[:, None], 0)
    size = len(idx) * ECE_BINS
    gap = np.bincount(codes.ravel(), weights=(keep * (o.top_correct[idx] - conf)).ravel(), minlength=size)
    return _ratio(np.abs(gap.reshape(len(idx), ECE_BINS)).sum(axis=1), scored.sum(axis=1).astype(np.float64))


def figures(o: Outcomes, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Every bootstrapped figure of one bundle, one value per resample (NaN where undefined)."""
    validated = _sums(o.validated, idx)
    out = _classification(o, idx)
    out.update(
        {
            "ece": _ece(o, idx),
            "referral_sensitivity": _ratio(_sums(o.refer_predicted & o.refer_truth, idx), _sums(o.refer_truth, idx)),
            "referral_specificity": _ratio(_sums(~o.refer_predicted & ~o.refer_truth, idx), _sums(~o.refer_truth, idx)),
            "validator_pass_rate": _ratio(_sums(o.validated & o.passed, idx), validated),
            "repeated_sentences_per_report": _ratio(_sums(o.repeats * o.validated, idx), validated),
            "grounding_agreement": _ratio(_sums(o.n_agree, idx), _sums(o.n_cited, idx)),
            "bleu4_sentence_mean": _sums(o.bleu4, idx) / idx.shape[1],
            "rouge_l_mean": _sums(o.rouge_l, idx) / idx.shape[1],
            "rubric_total_mean": _sums(o.rubric_total, idx) / idx.shape[1],
        }
    )
    return out


def _interval(draws: np.ndarray, level: float) -> list[float] | None:
    draws = draws[~np.isnan(draws)]
    if not len(draws):
        return None
    tail = 100 * (1 - level) / 2
    return [float(v) for v in np.percentile(draws, [tail, 100 - tail])]


def _point(value: np.ndarray) -> float | None:
    return None if np.isnan(value[0]) else float(value[0])


def paired_bootstrap(
    serving: Outcomes, candidate: Outcomes, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, dict]:
    """metric -> {serving, candidate, difference}: each {value, interval}; difference = candidate - serving
    on the same resampled eyes. A figure undefined on a resample (no referral in it, nothing cited) leaves
    that resample out of its interval."""
    if serving.n != candidate.n or not np.array_equal(serving.truth, candidate.truth):
        raise ValueError("the two bundles must be scored on the same eyes, in the same order")
    if serving.n == 0:
        raise ValueError("no eyes to compare")
    everyone = np.arange(serving.n)[None, :]
    idx = np.random.default_rng(seed).integers(0, serving.n, (resamples, serving.n))
    point = {"serving": figures(serving, everyone), "candidate": figures(candidate, everyone)}
    draws = {"serving": figures(serving, idx), "candidate": figures(candidate, idx)}
    out: dict[str, dict] = {}
    for metric in point["serving"]:
        row = {
            side: {"value": _point(point[side][metric]), "interval": _interval(draws[side][metric], level)}
            for side in ("serving", "candidate")
        }
        a, b = row["serving"]["value"], row["candidate"]["value"]
        row["difference"] = {
            "value": None if a is None or b is None else b - a,
            "interval": _interval(draws["candidate"][metric] - draws["serving"][metric], level),
        }
        out[metric] = row
    return out


def rule_text(resamples: int, seed: int, level: float = 0.95, margin: float = MACRO_F1_MARGIN) -> str:
    return RULE.format(level=level, margin=margin, safety=", ".join(SAFETY_FIGURES), resamples=resamples, seed=seed)


def verdict(table: dict[str, dict], margin: float = MACRO_F1_MARGIN) -> dict:
    """Apply the rule (`RULE`) to a `paired_bootstrap` table: {promote, reasons}; every check is listed."""
    checks: list[tuple[str, bool, str]] = []
    low = (table["macro_f1"]["difference"]["interval"] or [float("nan")])[0]
    checks.append(("macro_f1", low >= -margin, f"macro-F1 difference lower bound {low:+.4f} vs -{margin}"))
    for name in SAFETY_FIGURES:
        interval = table[name]["difference"]["interval"]
        if interval is None:  # undefined for either bundle on every resample: nothing to hold against it
            checks.append((name, True, f"{name}: not computable on these eyes"))
            continue
        checks.append((name, interval[1] >= 0, f"{name} difference upper bound {interval[1]:+.4f} vs 0"))
    return {
        "promote": all(ok for _, ok, _ in checks),
        "checks": [{"figure": n, "passed": ok, "detail": d} for n, ok, d in checks],
    }
