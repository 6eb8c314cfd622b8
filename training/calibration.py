"""Fit the calibration of a bundle's label probabilities, and store it in the bundle.

Given the raw label scores of a split's eyes (run by `python -m training.stage3.calibrate BUNDLE MANIFEST`,
which hands them in), it fits T (and, by default, a uniform share; see
grok_pacs.analysis.label_calibration) by minimising the cross-entropy of the true labels, smoothed by Laplace's
rule so that an error-free validation set cannot yield certainty (grid, then golden-section refinement).
It reports the expected calibration error (ECE, 15 equal-width confidence bins) before and after, and
writes `calibration.json` into the bundle with its manifest entry and sha256 (the runtime applies it), and
the eyes' raw scores beside the bundle (`<bundle>.calibration_fit.json`) so that a calibration can be
studied without re-running the model. A calibrated bundle behaves differently: give it a new version
(`--version`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from export.bundle_files import add_file
from grok_pacs.analysis.label_calibration import CALIBRATION_FILE, METHODS, Calibration

#: Temperature and a uniform share (grok_pacs.analysis.label_calibration says why the share).
DEFAULT_METHOD = "temperature+uniform"


def _matrix(scores: Sequence[dict[str, float]], labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if not scores or len(scores) != len(labels):
        raise ValueError(f"need one score dict per true label, got {len(scores)} and {len(labels)}")
    names = list(scores[0])
    if any(set(s) != set(names) for s in scores) or any(label not in names for label in labels):
        raise ValueError("every score dict must cover the same labels, and every true label must be one of them")
    logp = np.log(np.maximum(np.array([[s[n] for n in names] for s in scores], np.float64), 1e-12))
    return logp, np.array([names.index(label) for label in labels]), names


def _log_probs(logp: np.ndarray, temperature: float, uniform: float) -> np.ndarray:
    """log of Calibration(temperature, uniform).apply, row-wise, for every eye at once."""
    z = logp / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    if not uniform:
        return log_softmax
    return np.log((1.0 - uniform) * np.exp(log_softmax) + uniform / logp.shape[1])


def _targets(truth: np.ndarray, k: int, smooth: bool) -> np.ndarray:
    """One-hot true labels; smoothed by Laplace's rule of succession (1/(n+2) of the mass on the other labels),
    so that a validation set without a single error cannot make the fit certain (T at its bound, every
    probability 1.00: what an unsmoothed fit did on 32 error-free eyes)."""
    n = len(truth)
    eps = 1.0 / (n + 2) if smooth else 0.0
    target = np.full((n, k), eps / (k - 1))
    target[np.arange(n), truth] = 1.0 - eps
    return target


def _loss(logp: np.ndarray, target: np.ndarray, temperature: float, uniform: float) -> float:
    return float(-(target * _log_probs(logp, temperature, uniform)).sum(axis=1).mean())


def _golden(f, lo: float, hi: float, steps: int = 40) -> float:
    """The minimum of a unimodal f on [lo, hi]."""
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(steps):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if f(a) < f(b):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2


def fit(
    scores: Sequence[dict[str, float]], labels: Sequence[str], method: str = DEFAULT_METHOD, smooth: bool = True
) -> tuple[float, float]:
    """(T, uniform share) minimising the cross-entropy of the (smoothed) true labels under
    Calibration(T, uniform).apply: T in [0.05, 100] (what the runtime accepts), the share in [0, 0.45]
    ("temperature+uniform" only, else 0). A grid over both, then golden-section refinement of each."""
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r} is not one of {METHODS}")
    logp, truth, _ = _matrix(scores, labels)
    target = _targets(truth, logp.shape[1], smooth)
    log_t = np.linspace(math.log(0.05), math.log(100.0), 71)
    shares = np.linspace(0.0, 0.45, 91) if method == "temperature+uniform" else np.zeros(1)
    losses = np.array([[_loss(logp, target, math.exp(t), u) for u in shares] for t in log_t])
    i, j = np.unravel_index(int(np.argmin(losses)), losses.shape)
    lo, hi = log_t[max(i - 1, 0)], log_t[min(i + 1, len(log_t) - 1)]
    temperature = math.exp(_golden(lambda t: _loss(logp, target, math.exp(t), shares[j]), lo, hi))
    if len(shares) == 1:
        return temperature, 0.0
    lo, hi = shares[max(j - 1, 0)], shares[min(j + 1, len(shares) - 1)]
    return temperature, float(_golden(lambda u: _loss(logp, target, temperature, u), lo, hi))


def fit_temperature(scores: Sequence[dict[str, float]], labels: Sequence[str], smooth: bool = True) -> float:
    """The temperature alone (method "temperature"; see `fit`)."""
    return fit(scores, labels, "temperature", smooth)[0]


def expected_calibration_error(scores: Sequence[dict[str, float]], labels: Sequence[str], bins: int = 15) -> float:
    """ECE of the top label: sum over confidence bins of |accuracy - mean confidence| x bin share."""
    logp, truth, _ = _matrix(scores, labels)
    probs = np.exp(logp)
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    correct = (predicted == truth).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def ece_interval(
    scores: Sequence[dict[str, float]], labels: Sequence[str], draws: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95 % bootstrap interval of the ECE over these eyes (resampled with replacement): how much of a
    difference between two ECEs on ~100 eyes is noise."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    values = []
    for _ in range(draws):
        pick = rng.integers(0, n, n)
        values.append(expected_calibration_error([scores[i] for i in pick], [labels[i] for i in pick]))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def calibrate(
    scores: Sequence[dict[str, float]], labels: Sequence[str], fitted_on: str, method: str = DEFAULT_METHOD
) -> Calibration:
    """Fit the calibration and measure ECE before and after on the same eyes."""
    temperature, uniform = fit(scores, labels, method)
    cal = Calibration(temperature=temperature, method=method, uniform=uniform)
    return Calibration(
        temperature=temperature,
        method=method,
        uniform=uniform,
        fitted_on=fitted_on,
        n=len(labels),
        ece_before=expected_calibration_error(scores, labels),
        ece_after=expected_calibration_error([cal.apply(s) for s in scores], labels),
    )


def add_to_bundle(bundle_dir: str | Path, calibration: Calibration, version: str | None = None) -> Path:
    """Write calibration.json into the bundle, list and hash it in the manifest (and set `version`)."""
    text = json.dumps(calibration.to_dict(), indent=2) + "\n"
    return add_file(
        bundle_dir,
        CALIBRATION_FILE,
        lambda path: path.write_text(text, encoding="utf-8"),
        "calibration",
        {"method": calibration.method},
        version,
    )


def calibrate_bundle(
    bundle_dir: str | Path,
    cases: Sequence[str],
    scores: Sequence[dict[str, float]],
    labels: Sequence[str],
    fitted_on: str,
    *,
    method: str = DEFAULT_METHOD,
    version: str | None = None,
) -> Calibration:
    """Fit the calibration on predictions made elsewhere (each eye's id, raw label scores and true label) and
    store it in the bundle; the eyes' raw scores go to `<bundle>.calibration_fit.json`. The caller runs the
    model (training.stage3.calibrate): this module stays below the stages and the benchmark that use it."""
    cal = calibrate(scores, labels, fitted_on, method)
    add_to_bundle(bundle_dir, cal, version)
    fit_eyes = [{"case": c, "truth": t, "scores": s} for c, t, s in zip(cases, labels, scores, strict=True)]
    fit_file = Path(bundle_dir).with_name(Path(bundle_dir).name + ".calibration_fit.json")
    fit_file.write_text(json.dumps({"calibration": cal.to_dict(), "eyes": fit_eyes}) + "\n", encoding="utf-8")
    return cal
