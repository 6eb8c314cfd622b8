"""Judge-free scoring of three criteria of docs/domain.md, Evaluation: QuantitativeAccuracy, CoverageCompleteness,
DiagnosisAccuracy.

Deterministic stand-ins for the LLM judge on the criteria that can be checked mechanically:

QuantitativeAccuracy (0-20): start at 20; for every number the report cites (`grok_pacs.analysis.grounding`):
- tied to a measured biomarker: 0 when within 10 % of the measurement; -1 when 10-20 % off or in a wrong
  unit (a length on a ratio, micrometre digits labelled mm); -2 when more than 20 % off. A value both
  off and in a wrong unit costs the larger of the two deductions, never both;
- fabricated, -3: tied to no biomarker, or to one that was not measured, unless the same number appears
  in the reference report (then it is the reference's own number, not an invention: no deduction).
The score is 0 when the report cites no number at all, and never below 0.

CoverageCompleteness (0-10): +2 for each region the report mentions, by the keywords of
`COVERAGE_KEYWORDS` (matched at a word start, case-insensitive; a trailing `*` allows any ending).

DiagnosisAccuracy (0-20): 20 when the extracted label equals the reference label, else 0
(`Indeterminate` is always wrong).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from grok_pacs.domain.labels import Label
from training.benchmark.numbers import Citation, check_value, find_citations

QUANTITATIVE_MAX = 20
COVERAGE_MAX = 10
DIAGNOSIS_MAX = 20
COVERAGE_POINTS = 2

#: Region -> words that show the report looked at it.
COVERAGE_KEYWORDS: dict[str, tuple[str, ...]] = {
    "optic_disc": (
        "optic disc*",
        "optic disk*",
        "optic nerve*",
        "onh",
        "disc",
        "discs",
        "disk",
        "cup-to-disc",
        "cup to disc",
        "cup/disc",
        "c/d",
        "cdr",
        "cupping",
        "neuroretinal rim*",
        "papill*",
    ),
    "macula_fovea": ("macula*", "fovea*", "perifovea*", "parafovea*", "central subfield*", "etdrs"),
    "vasculature": (
        "vessel*",
        "vascula*",
        "arteriol*",
        "arteri*",
        "venul*",
        "vein*",
        "venous",
        "avr",
        "a/v",
        "av ratio",
        "av nicking",
        "tortuosity",
        "tortuous",
        "fractal*",
        "copper wir*",
        "silver wir*",
    ),
    "periphery_other": (
        "peripher*",
        "mid-peripher*",
        "haemorrhag*",
        "hemorrhag*",
        "exudat*",
        "microaneurysm*",
        "cotton wool*",
        "cotton-wool*",
        "drusen",
        "pigment* change*",
        "lesion*",
        "neovascular*",
        "vitreous",
        "media",
        "background retina*",
        "retinal background",
    ),
    "oct_layers": (
        "rnfl",
        "nerve fib*",
        "gcipl",
        "gc-ipl",
        "ganglion cell*",
        "inner nuclear layer",
        "inl",
        "inl-elm",
        "inl-rpe",
        "elm",
        "elm-isos",
        "external limiting membrane",
        "isos",
        "is/os",
        "isos-rpe",
        "ellipsoid zone",
        "photoreceptor*",
        "rpe",
        "retinal pigment epithel*",
        "retinal layer*",
        "outer retina*",
        "inner retina*",
        "subretinal fluid",
        "intraretinal",
    ),
}


@lru_cache(maxsize=1)
def _coverage_patterns() -> dict[str, re.Pattern[str]]:
    def fragment(word: str) -> str:
        body = re.escape(word.rstrip("*"))
        return body + (r"\w*" if word.endswith("*") else r"(?![\w])")

    return {
        region: re.compile(r"(?<![\w])(?:" + "|".join(fragment(w) for w in words) + ")", re.IGNORECASE)
        for region, words in COVERAGE_KEYWORDS.items()
    }


@dataclass(frozen=True)
class Deduction:
    text: str  #: the number as written
    biomarker_key: str | None
    reason: str  #: "10-20% off", ">20% off", "wrong unit", "fabricated"
    points: int


@dataclass(frozen=True)
class RubricScores:
    diagnosis: int  #: 0 or 20
    quantitative: int  #: 0-20
    coverage: int  #: 0-10
    deductions: list[Deduction] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)  #: coverage regions mentioned
    n_cited: int = 0

    @property
    def total(self) -> int:
        """Sum of the three criteria (at most 50)."""
        return self.diagnosis + self.quantitative + self.coverage


def _deduction_for(
    citation: Citation, reference_values: Mapping[str, float], reference_numbers: list[Citation]
) -> Deduction | None:
    """The deduction one cited number earns (None when it earns none)."""
    check = check_value(citation, reference_values)
    if check.reference is None:
        tolerance = 0.5 * 10.0**-citation.decimals + 1e-9
        if any(abs(n.value - citation.value) <= tolerance for n in reference_numbers):
            return None
        return Deduction(citation.text, citation.biomarker_key, "fabricated", 3)
    error = check.relative_error
    if error > 0.20:
        return Deduction(citation.text, check.biomarker_key, ">20% off", 2)
    if error > 0.10:
        return Deduction(citation.text, check.biomarker_key, "10-20% off", 1)
    if check.wrong_unit:
        return Deduction(citation.text, check.biomarker_key, "wrong unit", 1)
    return None


def quantitative_accuracy(
    text: str, reference_values: Mapping[str, float], reference_text: str = ""
) -> tuple[int, list[Deduction], int]:
    """(score 0-20, deductions, numbers cited) of a report against the measured biomarkers."""
    citations = find_citations(text)
    if not citations:
        return 0, [], 0
    reference_numbers = find_citations(reference_text)
    deductions = [d for c in citations if (d := _deduction_for(c, reference_values, reference_numbers))]
    return max(0, QUANTITATIVE_MAX - sum(d.points for d in deductions)), deductions, len(citations)


def coverage_regions(text: str) -> list[str]:
    """The COVERAGE_KEYWORDS regions the text mentions, in table order."""
    return [region for region, pattern in _coverage_patterns().items() if pattern.search(text)]


def coverage_completeness(text: str) -> int:
    """+2 per region mentioned (0-10)."""
    return min(COVERAGE_MAX, COVERAGE_POINTS * len(coverage_regions(text)))


def diagnosis_accuracy(predicted: Label, truth: Label) -> int:
    """20 when the labels agree, else 0."""
    return DIAGNOSIS_MAX if Label(predicted) == Label(truth) and predicted != Label.INDETERMINATE else 0


def score_report(
    text: str, label: Label, reference_label: Label, reference_values: Mapping[str, float], reference_text: str = ""
) -> RubricScores:
    """All three judge-free criteria for one generated report."""
    quantitative, deductions, n_cited = quantitative_accuracy(text, reference_values, reference_text)
    regions = coverage_regions(text)
    return RubricScores(
        diagnosis=diagnosis_accuracy(label, reference_label),
        quantitative=quantitative,
        coverage=min(COVERAGE_MAX, COVERAGE_POINTS * len(regions)),
        deductions=deductions,
        regions=regions,
        n_cited=n_cited,
    )
