"""Which label a report states, and why none: the two label rules of the engine (grok_pacs.analysis.engine).

- `lm_rule` (the language model decides; the paper's configuration, a bundle without a decision
  classifier): the validated findings' diagnosis line, stated only when a calibrated bundle gives that
  label a probability at or above the operating point; without a line, the best calibrated scored label
  at or above it; otherwise Indeterminate. Uncalibrated scores never decide.
- `classifier_rule` (the bundle's decision classifier decides, grok_pacs.model.decision): its label, stated
  only when its calibrated probability reaches the operating point and the validated findings (when
  shipped) conclude the same label; otherwise Indeterminate, saying why.

Each returns (label, impression, the label not stated or None).
"""

from __future__ import annotations

from grok_pacs.domain.labels import Label
from grok_pacs.model.decision import Decision


def scored_label(scores: dict[str, float], calibrated: bool, operating_point: float) -> Label:
    """The best calibrated scored label when its probability reaches the operating point, else Indeterminate."""
    if scores and calibrated:
        best = max(scores, key=scores.get)
        if scores[best] >= operating_point:
            return Label(best)
    return Label.INDETERMINATE


def lm_rule(
    concluded: Label | None, impression: str, scores: dict[str, float], calibrated: bool, operating_point: float
) -> tuple[Label, str, Label | None]:
    """The language model decides (see the module docstring)."""
    if concluded is None:
        return scored_label(scores, calibrated, operating_point), impression, None
    if not (calibrated and scores and scores.get(concluded.value, 0.0) < operating_point):
        return concluded, impression, None
    return (
        Label.INDETERMINATE,
        f"No diagnosis is stated: the findings conclude {concluded.value}, but its calibrated probability "
        f"{scores.get(concluded.value, 0.0):.2f} is below the operating point {operating_point:.2f}.",
        concluded,
    )


def classifier_rule(
    decision: Decision, concluded: Label | None, impression: str, operating_point: float
) -> tuple[Label, str, Label | None]:
    """The decision classifier decides (see the module docstring)."""
    d, p = decision.label.value, decision.probability
    if p < operating_point:
        why = f"the classifier's probability for {d}, {p:.2f}, is below the operating point {operating_point:.2f}"
    elif concluded is not None and concluded != decision.label:
        why = f"the classifier decided {d} ({p:.2f}) but the findings conclude {concluded.value}"
    else:
        return decision.label, impression, None
    return Label.INDETERMINATE, f"No diagnosis is stated: {why}.", decision.label
