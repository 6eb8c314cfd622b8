"""The learned quality head: P(ungradable) from an encoder's pooled feature, one logistic model per modality.

Trained by `training.quality_head` on phantom images and degraded copies of them, stored in the bundle as
`quality_head.npz` (listed and hashed in the manifest: `"quality_head": {"file", "threshold"}`). The
study job (grok_pacs.jobs.eye_analysis) asks it after the rule-based gate (grok_pacs.analysis.quality)
passed an image: a probability at or above the threshold makes the image ungradable with reason
`learned-quality`. A bundle without it changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

QUALITY_HEAD_FILE = "quality_head.npz"
MODALITIES = ("CFP", "OCT")


class QualityHeadError(ValueError):
    """A quality head that cannot be used; names what is wrong."""


@dataclass(frozen=True)
class LogisticModel:
    mean: np.ndarray  #: [D] feature mean (standardisation)
    scale: np.ndarray  #: [D] feature std
    weights: np.ndarray  #: [D]
    bias: float

    def __post_init__(self) -> None:
        shapes = {self.mean.shape, self.scale.shape, self.weights.shape}
        if (
            len(shapes) != 1
            or self.mean.ndim != 1
            or not np.all(np.isfinite(self.weights))
            or not np.all(self.scale > 0)
        ):
            raise QualityHeadError("quality head: mean, scale and weights must be finite [D] vectors, scale > 0")

    def probability(self, pooled: np.ndarray) -> float:
        z = float(((np.asarray(pooled, np.float64) - self.mean) / self.scale) @ self.weights + self.bias)
        return float(1.0 / (1.0 + np.exp(-np.clip(z, -50, 50))))


@dataclass(frozen=True)
class QualityHead:
    models: dict[str, LogisticModel]  #: modality -> model
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0 or not set(self.models) <= set(MODALITIES) or not self.models:
            raise QualityHeadError(
                f"quality head: threshold {self.threshold} must be in (0, 1), models in {MODALITIES}"
            )

    def save(self, path: Path) -> None:
        arrays = {
            f"{m}_{name}": getattr(model, name)
            for m, model in self.models.items()
            for name in ("mean", "scale", "weights")
        }
        arrays.update({f"{m}_bias": np.array(model.bias) for m, model in self.models.items()})
        with Path(path).open("wb") as handle:  # a handle: np.savez would append ".npz" to a path
            np.savez(handle, threshold=np.array(self.threshold), **arrays)

    @classmethod
    def load(cls, path: Path) -> QualityHead:
        try:
            with np.load(path) as data:
                models = {
                    m: LogisticModel(
                        data[f"{m}_mean"], data[f"{m}_scale"], data[f"{m}_weights"], float(data[f"{m}_bias"])
                    )
                    for m in MODALITIES
                    if f"{m}_weights" in data
                }
                return cls(models, float(data["threshold"]))
        except (OSError, KeyError, ValueError) as exc:
            raise QualityHeadError(f"quality head {path}: {exc}") from exc


def load_quality_head(root: Path, manifest: dict[str, Any]) -> QualityHead | None:
    """The bundle's quality head, or None when its manifest lists none."""
    entry = manifest.get("quality_head")
    return None if entry is None else QualityHead.load(Path(root) / entry["file"])
