"""The decision classifier: the component that decides each eye's label and states its probability.

A multinomial logistic regression on the 37 standardised biomarker estimates (the pattern head's model,
`grok_pacs.model.pattern`; its ridge strength chosen by cross-validation), with a temperature and an
operating point (the least probability at which a label is stated, for a stated target error among stated
labels) fitted on calibration eyes no fitted model saw: the training eyes out of fold and the validation
split (`training.decision`). Stored in the bundle as `decision.json` (manifest entry
`"decision": {"file"}`, hashed like every file).

Why a classifier decides and the language model writes: the label is a 7-way mapping from noisy
estimates, which a linear fit learns from a few hundred eyes and a small LM in one epoch does not; its
softmax probability ranks its own errors (a confident LM's label scores do not: every raw top score was
>= 0.997, right or wrong). The classifier is fitted on cross-fitted (out-of-fold) estimates of the
training eyes, so what it learns carries the errors served estimates have. The runtime states its label
with its calibrated probability; the LM writes the findings with the decided label in its prompt
(`prompt_line`), and findings that conclude another label leave the eye Indeterminate
(grok_pacs.analysis.engine). A bundle without the file lets the LM decide (the paper's configuration).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from grok_pacs.domain.labels import Label
from grok_pacs.model.pattern import KEYS, PatternHead, PatternHeadError

DECISION_FILE = "decision.json"
FORMAT = "grok-pacs-decision-classifier/1"


class DecisionError(ValueError):
    """A decision classifier that cannot be used; names what is wrong."""


@dataclass(frozen=True)
class Decision:
    """One eye's decision: the best label, its calibrated probability and every label's."""

    label: Label
    probability: float
    probabilities: dict[str, float]


@dataclass(frozen=True)
class DecisionClassifier:
    """softmax(logits / temperature) of a linear model on the estimates; a label is stated from `operating_point`."""

    model: PatternHead
    temperature: float = 1.0
    operating_point: float = 0.5  #: least calibrated probability at which the label is stated
    target_error: float = 0.05  #: the error among stated labels the operating point was chosen for
    prompt_line: bool = True  #: stage 3 trained the LM with the decided label as the prompt's last line
    fitted_on: dict[str, Any] = field(default_factory=dict)  #: what it was fitted and chosen on (provenance)

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)):
            raise DecisionError(f"decision classifier: temperature {self.temperature!r} is not a number")
        if not 0.01 <= self.temperature <= 100:
            raise DecisionError(f"decision classifier: temperature {self.temperature} is not in [0.01, 100]")
        if not 0.0 <= self.operating_point <= 1.0:
            raise DecisionError(f"decision classifier: operating point {self.operating_point} is not in [0, 1]")
        if not 0.0 < self.target_error < 1.0:
            raise DecisionError(f"decision classifier: target error {self.target_error} is not in (0, 1)")

    def probabilities_batch(self, rows: Sequence[Mapping[str, float]]) -> np.ndarray:
        """[N, L] calibrated label probabilities of N eyes' estimates."""
        m = self.model
        logits = (m._standardise(rows) @ m.weight + m.bias) / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def decide(self, estimates: Mapping[str, float]) -> Decision:
        """The label these estimates decide, with its calibrated probability (stated or not: see `states`)."""
        p = self.probabilities_batch([estimates])[0]
        best = int(p.argmax())
        probs = {label.value: float(v) for label, v in zip(self.model.labels, p)}
        return Decision(self.model.labels[best], float(p[best]), probs)

    def states(self, decision: Decision, operating_point: float | None = None) -> bool:
        """Whether the decision is stated: its probability reaches the operating point (the site's when given)."""
        threshold = self.operating_point if operating_point is None else operating_point
        return decision.probability >= threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": "multinomial logistic regression on standardised biomarker estimates, temperature-scaled",
            "temperature": self.temperature,
            "operating_point": self.operating_point,
            "target_error": self.target_error,
            "prompt_line": self.prompt_line,
            "fitted_on": self.fitted_on,
            "model": self.model.to_dict(),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> DecisionClassifier:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise DecisionError(f"decision classifier {path}: format {data.get('format')!r}, expected {FORMAT}")
            model = data["model"]
            if model["keys"] != list(KEYS):
                raise DecisionError(f"decision classifier {path}: its biomarker keys are not this schema's")
            head = PatternHead(
                np.array(model["mean"], np.float64),
                np.array(model["scale"], np.float64),
                np.array(model["weight"], np.float64),
                np.array(model["bias"], np.float64),
                tuple(Label(value) for value in model["labels"]),
            )
            return cls(
                head,
                float(data["temperature"]),
                float(data["operating_point"]),
                float(data["target_error"]),
                bool(data["prompt_line"]),
                dict(data.get("fitted_on", {})),
            )
        except DecisionError:
            raise
        except (OSError, KeyError, TypeError, ValueError, PatternHeadError) as exc:
            raise DecisionError(f"decision classifier {path}: {exc}") from exc


def load_decision(root: str | Path, manifest: Mapping[str, Any]) -> DecisionClassifier | None:
    """The bundle's decision classifier, or None when its manifest lists none (the LM decides)."""
    entry = manifest.get("decision")
    return None if entry is None else DecisionClassifier.load(Path(root) / entry["file"])
