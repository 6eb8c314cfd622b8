"""Out-of-distribution check: is this eye's image unlike the images the model was trained on (device shift)?

Per modality, the distribution of the encoder's pooled features over the training eyes: standardised, with a
Ledoit-Wolf shrunk covariance (a few hundred eyes against a few hundred feature dimensions). An image's
score is its Mahalanobis distance from that distribution over a threshold fitted on the validation eyes
(per modality the `1 - (1 - quantile) / 2` quantile of their distances, so that with both modalities about
`quantile`, 99 % by default, of in-distribution eyes score <= 1 on both). A
score above 1 for any modality of an eye makes the engine leave the eye Indeterminate with the reason
`OOD_REASON`. Stored in the bundle as `ood.npz` (listed and hashed in the manifest:
`"ood": {"file", "quantile"}`), fitted by `training.ood`. A bundle without it changes nothing.

A camera or OCT the model never saw shifts the features before it shifts the label: measured on the phantom's
held-out device in bench/shift.py (docs/benchmarks.md, Acquisition-device shift).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

OOD_FILE = "ood.npz"
MODALITIES = ("CFP", "OCT")
OOD_REASON = "image unlike the training images (device shift)"


class OodError(ValueError):
    """An OOD model that cannot be used; names what is wrong."""


@dataclass(frozen=True)
class FeatureDistribution:
    """One modality's training features: standardisation, shrunk precision matrix, fitted threshold."""

    mean: np.ndarray  #: [D]
    scale: np.ndarray  #: [D], > 0
    precision: np.ndarray  #: [D, D], of the standardised features
    threshold: float  #: the distance the validation quantile stays within

    def __post_init__(self) -> None:
        d = self.mean.shape
        if (
            self.mean.ndim != 1
            or self.scale.shape != d
            or self.precision.shape != (d[0], d[0])
            or not np.all(self.scale > 0)
            or not np.all(np.isfinite(self.precision))
            or not self.threshold > 0
        ):
            raise OodError("OOD model: mean, scale [D] (> 0), precision [D, D] finite and threshold > 0 required")

    def distance(self, pooled: np.ndarray) -> float:
        """Mahalanobis distance of one pooled feature [D] from the training features."""
        z = (np.asarray(pooled, np.float64).reshape(-1) - self.mean) / self.scale
        if z.shape != self.mean.shape:
            raise OodError(f"OOD model reads {self.mean.shape[0]}-d features, got {z.shape[0]}")
        return float(np.sqrt(max(z @ self.precision @ z, 0.0)))

    @classmethod
    def fit(cls, train: np.ndarray, val: np.ndarray, quantile: float = 0.99) -> FeatureDistribution:
        """Mean, scale and shrunk covariance from `train` [N, D]; threshold: `quantile` of `val` [M, D]'s distances."""
        x = np.asarray(train, np.float64)
        if x.ndim != 2 or len(x) < 3 or len(val) < 1:
            raise OodError(f"OOD fit needs >= 3 training and >= 1 validation features, got {len(x)} and {len(val)}")
        mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
        precision = np.linalg.inv(_ledoit_wolf((x - mean) / scale))
        unfitted = cls(mean, scale, precision, 1.0)
        distances = [unfitted.distance(v) for v in np.asarray(val, np.float64)]
        # 'higher': an observed distance, never interpolated below one (a small validation set passes >= quantile)
        return cls(mean, scale, precision, float(max(np.quantile(distances, quantile, method="higher"), 1e-6)))


_COVARIANCE_FLOOR = 1e-3  # in standardised units, far below any real feature's variance (1)


def _ledoit_wolf(z: np.ndarray) -> np.ndarray:
    """The Ledoit-Wolf (2004) shrinkage of the covariance of centred rows `z` toward a scaled identity."""
    n, p = z.shape
    s = z.T @ z / n
    mu = np.trace(s) / p
    target = s - mu * np.eye(p)
    delta = float((target**2).sum())
    row_norms = (z**2).sum(axis=1)
    beta = float((row_norms**2).sum() - 2 * ((z @ s) * z).sum() + n * (s**2).sum()) / n**2
    shrink = 1.0 if delta <= 0 else min(max(beta / delta, 0.0), 1.0)
    # The floor keeps a degenerate cohort (features without spread: identical images) invertible; a feature
    # constant in training that varies at run time then reads as far away, which it is.
    return (1 - shrink) * s + (shrink * mu + _COVARIANCE_FLOOR) * np.eye(p)


@dataclass(frozen=True)
class OodModel:
    models: Mapping[str, FeatureDistribution]  #: modality -> its training distribution
    quantile: float = 0.99  #: the validation quantile the thresholds were fitted at

    def __post_init__(self) -> None:
        if not self.models or not set(self.models) <= set(MODALITIES) or not 0.5 <= self.quantile < 1.0:
            raise OodError(f"OOD model: modalities in {MODALITIES}, quantile in [0.5, 1), got {self.quantile}")

    def scores(self, pooled: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Modality -> distance over threshold (> 1: unlike the training images), for the modalities given."""
        return {m: round(self.models[m].distance(f) / self.models[m].threshold, 4) for m, f in pooled.items()}

    def save(self, path: Path) -> None:
        arrays = {
            f"{m}_{name}": getattr(model, name)
            for m, model in self.models.items()
            for name in ("mean", "scale", "precision")
        }
        arrays.update({f"{m}_threshold": np.array(model.threshold) for m, model in self.models.items()})
        with Path(path).open("wb") as handle:  # a handle: np.savez would append ".npz" to a path
            np.savez(handle, quantile=np.array(self.quantile), **arrays)

    @classmethod
    def load(cls, path: Path) -> OodModel:
        try:
            with np.load(path) as data:
                models = {
                    m: FeatureDistribution(
                        data[f"{m}_mean"], data[f"{m}_scale"], data[f"{m}_precision"], float(data[f"{m}_threshold"])
                    )
                    for m in MODALITIES
                    if f"{m}_mean" in data
                }
                return cls(models, float(data["quantile"]))
        except (OSError, KeyError, ValueError) as exc:
            raise OodError(f"OOD model {path}: {exc}") from exc


def load_ood(root: Path, manifest: dict[str, Any]) -> OodModel | None:
    """The bundle's OOD model, or None when its manifest lists none."""
    entry = manifest.get("ood")
    return None if entry is None else OodModel.load(Path(root) / entry["file"])


def ood_impression(scores: Mapping[str, float]) -> str | None:
    """The impression of an eye whose image is unlike the training images, or None when none is."""
    shifted = [m for m, s in scores.items() if s > 1.0]
    if not shifted:
        return None
    detail = ", ".join(f"{m} {scores[m]:.1f}x" for m in shifted)
    return (
        f"No diagnosis is stated: {OOD_REASON}. The encoder features of this eye's {' and '.join(shifted)} lie "
        f"beyond the distance that in-distribution validation eyes stay within ({detail}); the measurements may "
        "be unreliable. Review the images."
    )
