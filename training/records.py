"""What the benchmark compares: a model's prediction and the reference for the same study/eye (shared by
stage 3, whose targets and evaluation are written in these records, and `training.benchmark`, which scores them)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from grok_pacs.analysis.result import Report
from grok_pacs.domain.biomarkers import BIOMARKERS, BY_KEY
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label


def _checked_values(values: Mapping[str, float], what: str) -> dict[str, float]:
    """Biomarker values keyed by `grok_pacs.domain.biomarkers` keys, NaN/None dropped; unknown keys are errors."""
    unknown = sorted(set(values) - set(BY_KEY))
    if unknown:
        raise ValueError(f"{what}: unknown biomarker keys {unknown}")
    return {k: float(v) for k, v in values.items() if v is not None and not math.isnan(float(v))}


@dataclass(frozen=True)
class Prediction:
    """A generated report: its parsed label, its text, and the biomarker estimates it carried (the SR's)."""

    case_id: str
    label: Label  #: parsed label, Label.INDETERMINATE when the generation named none
    text: str  #: the generated report as scored against the reference
    biomarkers: Mapping[str, float] = field(default_factory=dict)  #: estimates the SR carries; {} if none

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", Label(self.label))
        object.__setattr__(self, "biomarkers", _checked_values(self.biomarkers, f"prediction {self.case_id}"))

    @classmethod
    def from_report(cls, case_id: str, report: Report) -> Prediction:
        """From the runtime's `Report`: narrative + impression as text (the narrative alone where the label rule
        wrote the impression), head estimates as biomarkers, and the
        deciding component's label even where the report does not state it (the decision classifier's, or the
        language model's conclusion: a calibrated probability below the operating point, or findings that
        conclude another label), so the benchmark scores the decider, not the site's threshold; selective
        prediction (training.benchmark.selective) scores what was stated."""
        values = {b.key: b.value for b in report.biomarkers}
        label = report.unsupported_label or report.label
        # An eye the label rule left Indeterminate carries the rule's sentence as its impression ("No diagnosis
        # is stated: ... 0.49, is below the operating point 0.67"): the runtime's words, not the model's, so
        # neither the text metrics nor grounding score them (their probabilities read as unmatched citations).
        ruled = report.unsupported_label is not None
        text = report.narrative if ruled else report.text
        return cls(case_id=case_id, label=label, text=text, biomarkers=values)


@dataclass(frozen=True)
class Reference:
    """The ground truth of one case: label, reference (teacher) report and the measured biomarkers."""

    case_id: str
    label: Label  #: one of DIAGNOSTIC_LABELS
    text: str  #: the reference report
    biomarkers: Mapping[str, float]  #: the measurements (the biomarker JSON the judge reads)

    def __post_init__(self) -> None:
        label = Label(self.label)
        if label not in DIAGNOSTIC_LABELS:
            raise ValueError(f"reference {self.case_id}: label {label.value!r} is not a diagnostic label")
        object.__setattr__(self, "label", label)
        object.__setattr__(self, "biomarkers", _checked_values(self.biomarkers, f"reference {self.case_id}"))


def biomarkers_from_prompt_json(prompt_json: str | Mapping) -> dict[str, float]:
    """Biomarker values keyed by key from the paper's prompt JSON (`biomarkers.to_prompt_json` format).

    Unknown names are errors (a renamed biomarker must not silently vanish from the benchmark).
    """
    data = json.loads(prompt_json) if isinstance(prompt_json, str) else prompt_json
    by_name = {b.prompt_name: b.key for b in BIOMARKERS}
    values = {}
    for group in ("OCT_Measures", "CFP_Measures"):
        for name, value in data.get(group, {}).items():
            if name not in by_name:
                raise ValueError(f"unknown biomarker name {name!r} in {group}")
            values[by_name[name]] = float(value)
    return values


def pair_up(predictions: list[Prediction], references: list[Reference]) -> list[tuple[Prediction, Reference]]:
    """Pairs by case id, in reference order; every id must appear exactly once on both sides."""

    def index(items: list, what: str) -> dict:
        table = {}
        for item in items:
            if item.case_id in table:
                raise ValueError(f"duplicate case id {item.case_id!r} in {what}")
            table[item.case_id] = item
        return table

    preds, refs = index(predictions, "predictions"), index(references, "references")
    if set(preds) != set(refs):
        missing, extra = sorted(set(refs) - set(preds)), sorted(set(preds) - set(refs))
        raise ValueError(f"case ids differ: no prediction for {missing[:10]}, no reference for {extra[:10]}")
    return [(preds[case_id], refs[case_id]) for case_id in refs]
