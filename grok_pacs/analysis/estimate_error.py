"""How far each biomarker estimate typically is from the measured value, as the bundle found on its
validation eyes (training.estimate_error fits it; `estimate_error.json` in the bundle).

Per biomarker: the `quantile` (0.9) of |estimate - measured| over the validation eyes, in the biomarker's
unit. The engine attaches it to each `BiomarkerEstimate.error`; the urgent rows of the disposition table
read it (grok_pacs.report.dispositions, `cautious`): a sign of wet AMD or of diabetic macular oedema whose
estimate lies within its error below the threshold cannot be ruled out, so the eye is referred urgently.
A bundle without the file gives no errors and the table compares the estimates alone, as before.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grok_pacs.domain.biomarkers import BY_KEY

ERROR_FILE = "estimate_error.json"
FORMAT = "grok-pacs-estimate-error/1"


@dataclass(frozen=True)
class EstimateErrors:
    """Per biomarker key, the `quantile` of the absolute estimate error over `n_eyes` validation eyes."""

    quantile: float
    n_eyes: int
    errors: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.5 <= self.quantile < 1.0 or self.n_eyes < 1:
            raise ValueError(f"estimate errors: quantile {self.quantile} must be in [0.5, 1), n_eyes >= 1")
        for key, value in self.errors.items():
            if key not in BY_KEY or not math.isfinite(value) or value < 0:
                raise ValueError(f"estimate errors: {key!r} -> {value!r} is not a known biomarker's error >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "quantile": self.quantile, "n_eyes": self.n_eyes, "errors": self.errors}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EstimateErrors:
        if data.get("format") != FORMAT:
            raise ValueError(f"estimate errors: format {data.get('format')!r} is not {FORMAT!r}")
        return cls(float(data["quantile"]), int(data["n_eyes"]), {k: float(v) for k, v in data["errors"].items()})

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> EstimateErrors:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def load_estimate_errors(root: Path, manifest: Mapping[str, Any]) -> EstimateErrors | None:
    """The bundle's estimate errors, or None when its manifest lists none."""
    entry = manifest.get("estimate_error")
    return None if entry is None else EstimateErrors.load(Path(root) / entry["file"])
