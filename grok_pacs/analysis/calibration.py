"""Calibrated label probabilities: temperature scaling of the engine's label scores (SPEC §7).

The engine's scores are a softmax over the 7 labels' continuation log-likelihoods; a temperature T fitted
on a validation split (training.calibration) rescales them: p_i = softmax(log s_i / T). T > 1 softens an
over-confident model, T < 1 sharpens an under-confident one; the ranking (and so the best label) never
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


class CalibrationError(ValueError):
    """A calibration that cannot be applied; names what is wrong."""


@dataclass(frozen=True)
class Calibration:
    temperature: float
    method: str = "temperature"
    fitted_on: str = ""  #: what it was fitted on, e.g. "phantom val split, 60 eyes"
    n: int = 0  #: validation eyes used
    ece_before: float | None = None  #: expected calibration error on those eyes, before and after
    ece_after: float | None = None

    def __post_init__(self) -> None:
        if self.method != "temperature":
            raise CalibrationError(f"calibration method {self.method!r} is not supported (only 'temperature')")
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
        probs /= probs.sum()
        return {label: float(p) for label, p in zip(labels, probs)}

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
