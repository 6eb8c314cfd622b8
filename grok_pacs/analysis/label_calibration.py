"""Calibrated label probabilities: temperature scaling of the engine's label scores (docs/domain.md, Clinical safety).

The engine's scores are a softmax over the 7 labels' continuation log-likelihoods; a temperature T fitted
on a validation split (training.calibration) rescales them: q_i = softmax(log s_i / T). T > 1 softens an
over-confident model, T < 1 sharpens an under-confident one. Method "temperature+uniform" also mixes in
a share `uniform` of the uniform distribution, p_i = (1 - u) q_i + u / K: a model that is wrong on a few
eyes with the same confidence as on the rest (a confident pattern it misread) cannot be calibrated by T
alone, since no temperature separates those eyes; the mixture caps every probability at 1 - u (K-1)/K,
which is what its validation error rate says. Either way the ranking (and so the best label) never
changes, only how far a site can trust the number. A bundle carries it as `calibration.json`, listed in
its manifest (`"calibration": {"file": ...}`) and hashed like every other file; without it the scores
are reported as uncalibrated.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

CALIBRATION_FILE = "calibration.json"
_FLOOR = 1e-12  # a zero score would be log(0): treat it as vanishingly small
METHODS = ("temperature", "temperature+uniform")


class CalibrationError(ValueError):
    """A calibration that cannot be applied; names what is wrong."""


@dataclass(frozen=True)
class Calibration:
    temperature: float
    method: str = "temperature"
    uniform: float = 0.0  #: share of the uniform distribution mixed in ("temperature+uniform" only), < 0.5
    fitted_on: str = ""  #: what it was fitted on, e.g. "phantom val split, 60 eyes"
    n: int = 0  #: validation eyes used
    ece_before: float | None = None  #: expected calibration error on those eyes, before and after
    ece_after: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CalibrationError(f"calibration method {self.method!r} is not supported (one of {METHODS})")
        if not (isinstance(self.uniform, (int, float)) and 0.0 <= self.uniform < 0.5):
            raise CalibrationError(f"calibration uniform share {self.uniform!r} is not in [0, 0.5)")
        if self.method == "temperature" and self.uniform:
            raise CalibrationError("a 'temperature' calibration mixes in no uniform share: use 'temperature+uniform'")
        if not (
            isinstance(self.temperature, (int, float))
            and math.isfinite(self.temperature)
            and 0.01 <= self.temperature <= 100
        ):
            raise CalibrationError(f"calibration temperature {self.temperature!r} is not in [0.01, 100]")

    def apply(self, scores: dict[str, float]) -> dict[str, float]:
        """The calibrated probabilities of `scores` (label -> probability); empty stays empty."""
        if not scores:
            return {}
        labels = list(scores)
        logits = np.log(np.maximum(np.array([scores[k] for k in labels], np.float64), _FLOOR)) / self.temperature
        probs = np.exp(logits - logits.max())
        probs = (1.0 - self.uniform) * probs / probs.sum() + self.uniform / len(labels)
        return {label: float(p) for label, p in zip(labels, probs)}

    def invert(self, probs: dict[str, float]) -> dict[str, float]:
        """The engine's raw scores (up to their normalisation) behind calibrated `probs`: apply's inverse."""
        if not probs:
            return {}
        labels = list(probs)
        q = (np.array([probs[k] for k in labels], np.float64) - self.uniform / len(labels)) / (1.0 - self.uniform)
        logs = np.log(np.maximum(q, 1e-300)) * self.temperature
        raw = np.exp(logs - logs.max())
        return {label: float(v) for label, v in zip(labels, raw / raw.sum())}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        try:
            return cls(**data)
        except TypeError as exc:
            raise CalibrationError(f"calibration fields are invalid: {exc}") from exc


def load_calibration(root, manifest: dict[str, Any]) -> Calibration | None:
    """The bundle's calibration (None when its manifest lists none); CalibrationError when unreadable."""
    entry = manifest.get("calibration")
    if entry is None:
        return None
    path = root / entry["file"]
    try:
        return Calibration.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"bundle calibration {path}: {exc}") from exc
