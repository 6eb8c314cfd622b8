"""The biomarker pattern head: which label's pattern the 37 estimates resemble most, as the prompt states it.

A multinomial logistic regression on the standardised estimates (numpy), fitted by stage 3 on its training
eyes' estimates (`training.pattern`) and stored in the bundle as `pattern_head.json` (manifest entry
`"pattern_head": {"file"}`, hashed like every file). The prompt then carries one line,
"Closest biomarker pattern: <label>." (`grok_pacs.model.prompt`), in training and at run time alike.

Why: the language model must go from the estimates to a label. A linear classifier on the same estimates
names the label far better than a small LM that learns the 7-way mapping from a few hundred reports
(bench/results/phantom.json: probe 0.79 against 0.14 macro-F1), so the mapping is computed and written in
the prompt, where the model can read it like any estimate, and the model reasons from it and the images.
A bundle without the file has no pattern line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from grok_pacs.domain.biomarkers import BIOMARKERS
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label

PATTERN_HEAD_FILE = "pattern_head.json"
KEYS: tuple[str, ...] = tuple(b.key for b in BIOMARKERS)


class PatternHeadError(ValueError):
    """A pattern head that cannot be used; names what is wrong."""


@dataclass(frozen=True)
class PatternHead:
    """softmax(((x - mean) / scale) @ weight + bias) over `labels`; a missing estimate counts as the mean."""

    mean: np.ndarray  #: [37] training mean of each estimate (BIOMARKERS order)
    scale: np.ndarray  #: [37] training standard deviation, > 0
    weight: np.ndarray  #: [37, L]
    bias: np.ndarray  #: [L]
    labels: tuple[Label, ...] = DIAGNOSTIC_LABELS

    def __post_init__(self) -> None:
        n, k = len(KEYS), len(self.labels)
        if (
            self.mean.shape != (n,)
            or self.scale.shape != (n,)
            or self.weight.shape != (n, k)
            or self.bias.shape != (k,)
        ):
            raise PatternHeadError(f"pattern head: expected mean/scale [{n}], weight [{n}, {k}], bias [{k}]")
        arrays = (self.mean, self.scale, self.weight, self.bias)
        if not all(np.all(np.isfinite(a)) for a in arrays) or not np.all(self.scale > 0):
            raise PatternHeadError("pattern head: every parameter must be finite and every scale > 0")
        if Label.INDETERMINATE in self.labels or len(set(self.labels)) != k:
            raise PatternHeadError(f"pattern head: labels must be distinct diagnostic labels, got {self.labels}")

    def _standardise(self, rows: Sequence[Mapping[str, float]]) -> np.ndarray:
        x = np.array([[float(row.get(key, math.nan)) for key in KEYS] for row in rows], np.float64)
        x = np.where(np.isnan(x), self.mean, x)
        return (x - self.mean) / self.scale

    def probabilities_batch(self, rows: Sequence[Mapping[str, float]]) -> np.ndarray:
        """[N, L] label probabilities of N eyes' estimates."""
        logits = self._standardise(rows) @ self.weight + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def probabilities(self, estimates: Mapping[str, float]) -> dict[Label, float]:
        """Each label's probability for one eye's estimates."""
        return dict(zip(self.labels, map(float, self.probabilities_batch([estimates])[0])))

    def closest(self, estimates: Mapping[str, float]) -> Label:
        """The label whose pattern the estimates resemble most."""
        p = self.probabilities(estimates)
        return max(p, key=p.get)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "multinomial logistic regression on standardised biomarker estimates",
            "keys": list(KEYS),
            "labels": [label.value for label in self.labels],
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "weight": self.weight.tolist(),
            "bias": self.bias.tolist(),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> PatternHead:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if data["keys"] != list(KEYS):
                raise PatternHeadError(f"pattern head {path}: its biomarker keys are not this schema's")
            return cls(
                np.array(data["mean"], np.float64),
                np.array(data["scale"], np.float64),
                np.array(data["weight"], np.float64),
                np.array(data["bias"], np.float64),
                tuple(Label(value) for value in data["labels"]),
            )
        except (OSError, KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, PatternHeadError):
                raise
            raise PatternHeadError(f"pattern head {path}: {exc}") from exc


def load_pattern_head(root: str | Path, manifest: Mapping[str, Any]) -> PatternHead | None:
    """The bundle's pattern head, or None when its manifest lists none."""
    entry = manifest.get("pattern_head")
    return None if entry is None else PatternHead.load(Path(root) / entry["file"])
