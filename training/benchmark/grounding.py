"""Grounding check: does every number a report cites equal the measurement its SR carries?

A report is grounded when the numbers in its text are the biomarker estimates written next to it in the
SR (`Report.biomarkers`), not numbers the language model made up. For each cited number
(`grok_pacs.analysis.grounding`): agreed = tied to a biomarker whose estimate, rounded as the text rounds it,
gives the cited value (`numbers.within_rounding`). Agreement = agreed / cited, so unmatched numbers and
numbers about biomarkers without an estimate count against it. A report citing nothing has no agreement
(None), and pooled results say how many such reports there were.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from grok_pacs.analysis.parsing import parse_generation
from grok_pacs.analysis.result import Report, findings_text
from training.benchmark.numbers import find_citations, within_rounding


@dataclass(frozen=True)
class Mismatch:
    text: str  #: the cited number as written
    biomarker_key: str | None
    estimate: float | None  #: the SR's value (None: unmatched number or no estimate)
    reason: str  #: "unmatched", "no estimate", "disagrees"


@dataclass(frozen=True)
class GroundingResult:
    n_cited: int
    n_agree: int
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def agreement(self) -> float | None:
        """Fraction of cited numbers that agree with the SR (None when nothing is cited)."""
        return self.n_agree / self.n_cited if self.n_cited else None

    def count(self, reason: str) -> int:
        return sum(m.reason == reason for m in self.mismatches)

    def to_dict(self) -> dict:
        return {
            "n_cited": self.n_cited,
            "n_agree": self.n_agree,
            "agreement": self.agreement,
            "n_unmatched": self.count("unmatched"),
            "n_no_estimate": self.count("no estimate"),
            "n_disagree": self.count("disagrees"),
            "mismatches": [vars(m) for m in self.mismatches],
        }


def check_grounding(text: str, estimates: Mapping[str, float]) -> GroundingResult:
    """Compare every number `text` cites with `estimates` (biomarker key -> value in its unit)."""
    citations = find_citations(text)
    mismatches = []
    for citation in citations:
        key = citation.biomarker_key
        if key is None:
            mismatches.append(Mismatch(citation.text, None, None, "unmatched"))
        elif key not in estimates:
            mismatches.append(Mismatch(citation.text, key, None, "no estimate"))
        elif not within_rounding(citation, key, estimates[key]):
            mismatches.append(Mismatch(citation.text, key, estimates[key], "disagrees"))
    return GroundingResult(len(citations), len(citations) - len(mismatches), mismatches)


def check_report_grounding(report: Report) -> GroundingResult:
    """The grounding of a runtime `Report`: its narrative and impression against its own estimates."""
    return _grounding_of(report.narrative, report.impression, report)


def check_model_grounding(report: Report) -> GroundingResult:
    """The grounding of what the model wrote (`raw_text`), before the runtime wrote misquoted numbers as
    the estimates (`grok_pacs.analysis.grounding.ground_cited_numbers`): how well the LLM itself cites its prompt."""
    return check_generation_grounding(report.raw_text, {b.key: b.value for b in report.biomarkers})


def check_generation_grounding(raw_text: str, estimates: Mapping[str, float]) -> GroundingResult:
    """The grounding of a whole generation (findings paragraph, then the diagnosis line) against `estimates`."""
    parsed = parse_generation(raw_text)
    return check_grounding(findings_text(parsed.narrative, parsed.impression), estimates)


def _grounding_of(narrative: str, impression: str, report: Report) -> GroundingResult:
    return check_grounding(findings_text(narrative, impression), {b.key: b.value for b in report.biomarkers})


def pooled(results: Iterable[GroundingResult]) -> dict:
    """Totals over reports: pooled agreement (all numbers) and the mean of per-report agreements."""
    results = list(results)
    cited = sum(r.n_cited for r in results)
    per_report = [r.agreement for r in results if r.agreement is not None]
    return {
        "n_reports": len(results),
        "n_reports_citing_nothing": sum(r.n_cited == 0 for r in results),
        "n_cited": cited,
        "n_agree": sum(r.n_agree for r in results),
        "agreement_pooled": sum(r.n_agree for r in results) / cited if cited else None,
        "agreement_mean_per_report": sum(per_report) / len(per_report) if per_report else None,
        "n_unmatched": sum(r.count("unmatched") for r in results),
        "n_no_estimate": sum(r.count("no estimate") for r in results),
        "n_disagree": sum(r.count("disagrees") for r in results),
    }
