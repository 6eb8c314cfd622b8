"""Cited numbers of a report compared with measured values (used by the rubric and the grounding check).

Extraction and biomarker matching live in `grok_pacs.analysis.grounding` (the runtime fills `Report.cited_numbers`
with the same code); this module adds the comparisons: unit handling, relative error, rounding tolerance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from grok_pacs.analysis.grounding import (
    Citation,
    extract_cited_numbers,
    find_citations,
    in_biomarker_unit,
    within_rounding,
)
from grok_pacs.domain.biomarkers import BY_KEY

__all__ = [
    "Citation",
    "ValueCheck",
    "check_value",
    "extract_cited_numbers",
    "find_citations",
    "in_biomarker_unit",
    "relative_error",
    "within_rounding",
]


def relative_error(value: float, truth: float) -> float:
    """|value - truth| / |truth| (absolute error when the truth is 0)."""
    return abs(value - truth) / abs(truth) if truth else abs(value - truth)


def _unit_is_wrong(citation: Citation, key: str, truth: float) -> bool:
    """A length unit on a ratio, or micrometre digits labelled mm (or the reverse)."""
    if citation.unit not in ("um", "mm"):
        return False  # no unit written is not a wrong unit
    if BY_KEY[key].unit == "1":
        return True
    as_written = relative_error(citation.value, truth)
    return citation.unit == "mm" and as_written <= 0.10 < relative_error(citation.value_in_um, truth)


@dataclass(frozen=True)
class ValueCheck:
    """One cited number checked against the reference measurements."""

    text: str
    biomarker_key: str | None
    reference: float | None  #: the measured value (None: unmatched or not measured)
    relative_error: float | None  #: of the cited value in the biomarker's unit (or as written, unit wrong)
    wrong_unit: bool


def check_value(citation: Citation, reference: Mapping[str, float]) -> ValueCheck:
    """Compare one citation with the measured value of its biomarker (if any)."""
    key = citation.biomarker_key
    if key is None or key not in reference:
        return ValueCheck(citation.text, key, None, None, False)
    truth = reference[key]
    wrong_unit = _unit_is_wrong(citation, key, truth)
    value = citation.value if wrong_unit else in_biomarker_unit(citation, key)
    return ValueCheck(citation.text, key, truth, relative_error(value, truth), wrong_unit)
