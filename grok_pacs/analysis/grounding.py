"""Numbers a report narrative cites, each tied to the biomarker it describes (docs/domain.md, Biomarkers).

Why one module: the runtime fills `Report.cited_numbers` with `extract_cited_numbers` and the benchmark
(`training.benchmark`) scores the very same extraction, so a report is read one way everywhere.

What is a cited number: a number written as a value ("0.720", "24.1 µm", "1,820 um", "1.82 mm",
"150/95 mmHg"). What is not (skipped, documented in `_skip_reason`): digits inside identifiers ("H35.3",
"ICD-10", "3D", "1st"), scan dimensions ("6 x 6 mm"), reference ranges and thresholds ("normal 25-35",
"between 0.2 and 0.5", "above 0.6", "threshold of 0.65"), percentages (relative claims, not values) and
counts of things ("3 quadrants", "2 disc diameters", "4 microaneurysms").

How a number is tied to a biomarker (aliases: `grok_pacs.domain.aliases`): the number takes the
alias that ends nearest before it within its clause (not past the previous number or the sentence
start); among aliases ending at the same place the one spelling out most letters (the most specific)
wins, so "INL-ELM central subfield" beats "central subfield". Only when nothing precedes it, an alias
that starts just after it ("0.72 cup-to-disc ratio") is used. Lists: numbers joined only by "and" or
commas ("arterial and venular fractal dimensions of 1.41 and 1.40") take, in order, the biomarkers of a
list of as many names joined the same way just before the first number; without such a list they all
take the first number's biomarker ("cup-to-disc ratio 0.72 and 0.70"). A number with a non-length unit
(mmHg, years, °) is never tied to a biomarker. Values are kept as written; `Citation.value_in_um`
converts millimetres.

Grounding (`ground_cited_numbers`): the runtime writes each cited number that disagrees with its
biomarker's estimate as that estimate, so a report never contradicts the measurements its SR carries;
the model's own words stay in `Report.raw_text` and the count of rewritten numbers in the Report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from grok_pacs.analysis.result import CitedNumber
from grok_pacs.domain.aliases import ALIASES, AliasHit, alias_hits
from grok_pacs.domain.biomarkers import BY_KEY, format_value

__all__ = [
    "ALIASES",
    "Citation",
    "extract_cited_numbers",
    "find_citations",
    "ground_cited_numbers",
    "in_biomarker_unit",
    "within_rounding",
]


@dataclass(frozen=True)
class Citation:
    """A cited number with where it stands, its written unit and the biomarker it was tied to."""

    text: str  #: the number as written, e.g. "0.720" or "1,820"
    value: float  #: the number as written (no unit conversion)
    unit: str | None  #: "um", "mm", "other" (mmHg, years, ...) or None (no unit written)
    biomarker_key: str | None
    start: int  #: span of the number in the text
    end: int

    @property
    def decimals(self) -> int:
        """Digits written after the decimal point (the rounding the writer applied)."""
        return len(self.text.split(".", 1)[1]) if "." in self.text else 0

    @property
    def value_in_um(self) -> float:
        """The value in micrometres when written in mm, else the value as written."""
        return self.value * 1000.0 if self.unit == "mm" else self.value

    def to_cited_number(self) -> CitedNumber:
        return CitedNumber(text=self.text, value=self.value, biomarker_key=self.biomarker_key)


_NUMBER_RE = re.compile(r"(?<![\w.,/])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)")
_LENGTH_UNIT_RE = re.compile(
    r"\s*-?\s*(µm|μm|um|microns?|micromet(?:er|re)s?|mm(?!\s*hg)|millimet(?:er|re)s?)(?![a-z])", re.IGNORECASE
)
_OTHER_UNIT_RE = re.compile(
    r"(?:\s*-?\s*(?:mm\s*hg|years?|yrs?|y/o|months?|weeks?|days?|°|degrees?|dioptres?|diopters?|mg|kg|ml|"
    r"mmol|mg/dl|bpm|cm)(?![a-z])|/\d)",
    re.IGNORECASE,
)
_COUNT_RE = re.compile(
    r"\s*-?\s*(?:quadrants?|o'?clock|clock[\s-]hours?|disc[\s-]diameters?|dd|b-?scans?|scans?|frames?|images?|"
    r"words?|fields?|eyes?|microaneurysms?|ha?emorrhages?|exudates?|spots?|lesions?|drusen|sectors?|subfields?|"
    r"times|fold|areas?|vessels?|points?|criteria|categories|labels?)(?![a-z])",
    re.IGNORECASE,
)
_THRESHOLD_RE = re.compile(
    r"(?:\bnormal|\breference|\bexpected|\btypical(?:ly)?|\busual(?:ly)?|\bthreshold|\bcut-?off|\blimit|"
    r"\branges?|[<>≤≥]|\babove|\bbelow|\bunder|\bover|\bexceed(?:ing|s)?|\bgreater than|\bless than|"
    r"\bmore than|\bup to|\bat least|\bat most)"
    r"(?:[\s:=~]+(?:range|limits?|values?|of|is|are|being|around|about|the|a|for|adults?)\b)*[\s:=~]*$",
    re.IGNORECASE,
)
_BOUNDARY_RE = re.compile(r"[.!?](?=\s|$)|[;\n]")


def _skip_reason(text: str, match: re.Match[str]) -> str | None:
    """Why the number at `match` is not a cited value (None when it is one)."""
    start, end = match.span()
    before, after = text[max(0, start - 60) : start], text[end : end + 40]
    if re.match(r"[a-z]", after, re.IGNORECASE) and not _LENGTH_UNIT_RE.match(after):
        return "identifier"  # 3D, 1st, 6x6, 24.1abc
    if re.search(r"[a-z]-$", before, re.IGNORECASE):
        return "identifier"  # ICD-10, T-2
    if re.match(r"\s*[x×]\s*\d", after) or re.search(r"\d\s*[x×]\s*$", before):
        return "dimension"  # 6 x 6 mm scan
    if re.match(r"\s*(?:[-–—]|to)\s*\d", after) or re.search(r"\d\s*(?:[-–—]|to)\s*$", before):
        return "range"
    if re.search(r"\bbetween\s*$", before, re.IGNORECASE) or re.search(r"\bbetween\s+[\d.,]+\s+and\s+$", before):
        return "range"
    if _THRESHOLD_RE.search(before):
        return "threshold"
    if re.match(r"\s*%|\s*per\s*cent", after, re.IGNORECASE):
        return "percentage"
    if _COUNT_RE.match(after):
        return "count"
    return None


def _unit_after(text: str, end: int) -> tuple[str | None, int]:
    """The unit written right after a number ("um", "mm", "other" or None) and where it ends."""
    length = _LENGTH_UNIT_RE.match(text, end)
    if length:
        unit = "mm" if length.group(1).lower().startswith(("mm", "milli")) else "um"
        return unit, length.end()
    other = _OTHER_UNIT_RE.match(text, end)
    return ("other", other.end()) if other else (None, end)


def _clause_start(text: str, start: int, previous_end: int) -> int:
    """Where the clause of a number begins: after the previous number, sentence boundary or 160 chars."""
    boundaries = [m.end() for m in _BOUNDARY_RE.finditer(text, 0, start)]
    return max([previous_end, start - 160, *boundaries[-1:]])


def _clause_end(text: str, end: int, next_start: int) -> int:
    """Where the text a number may look ahead into ends: next number, comma, sentence end or 40 chars."""
    stop = re.compile(r"[,.;:!?\n(]").search(text, end)
    return min(next_start, end + 40, stop.start() if stop else len(text))


def _pick_key(hits: list[AliasHit], lo: int, start: int, end: int, hi: int) -> str | None:
    """The alias ending nearest before the number (most specific on ties); else the first just after it."""
    before = [h for h in hits if lo <= h[0] and h[1] <= start]
    if before:
        return max(before, key=lambda h: (h[1], h[2]))[3]
    after = [h for h in hits if end <= h[0] and h[1] <= hi]
    return min(after, key=lambda h: (h[0], -h[2]))[3] if after else None


_LIST_GAP_RE = re.compile(r"[\s,()]*(?:and|or|&|as well as)?[\s,()]*", re.IGNORECASE)


def _named_list(text: str, hits: list[AliasHit]) -> list[str]:
    """The biomarkers of the list of names that ends a clause ("arterial and venular FD"), in order."""
    clusters: list[list[AliasHit]] = []
    for hit in sorted(hits):
        if clusters and hit[0] < max(h[1] for h in clusters[-1]):
            clusters[-1].append(hit)
        else:
            clusters.append([hit])
    names = [(min(h[0] for h in c), max(h[1] for h in c), max(c, key=lambda h: (h[1], h[2]))[3]) for c in clusters]
    chain = names[-1:]
    for name in reversed(names[:-1]):
        if not _LIST_GAP_RE.fullmatch(text, name[1], chain[0][0]):
            break
        chain.insert(0, name)
    return [name[2] for name in chain]


@dataclass
class _Number:
    match: re.Match[str]
    unit: str | None
    unit_end: int
    window: list[AliasHit]  #: hits within the clause before the number
    key: str | None = None


def _assign_lists(text: str, numbers: list[_Number]) -> None:
    """Re-key runs of numbers joined by list connectors (see the module docstring)."""
    i = 0
    while i < len(numbers):
        j = i + 1
        while (
            j < len(numbers)
            and numbers[i].unit != "other"
            and numbers[j].unit != "other"
            and not numbers[j].window
            and _LIST_GAP_RE.fullmatch(text, numbers[j - 1].unit_end, numbers[j].match.start())
        ):
            j += 1
        if j - i > 1 and numbers[i].key is not None:
            names = _named_list(text, numbers[i].window)
            keys = names[-(j - i) :] if len(names) >= j - i else [numbers[i].key] * (j - i)
            for number, key in zip(numbers[i:j], keys):
                number.key = key
        i = j


def find_citations(text: str) -> list[Citation]:
    """All cited numbers in `text`, in order, each with its unit and biomarker key (or None)."""
    matches = [m for m in _NUMBER_RE.finditer(text) if _skip_reason(text, m) is None]
    hits = alias_hits(text)
    numbers: list[_Number] = []
    for index, match in enumerate(matches):
        unit, unit_end = _unit_after(text, match.end())
        lo = _clause_start(text, match.start(), numbers[-1].unit_end if numbers else 0)
        number = _Number(match, unit, unit_end, [h for h in hits if lo <= h[0] and h[1] <= match.start()])
        if unit != "other":
            next_start = matches[index + 1].start() if index + 1 < len(matches) else len(text)
            number.key = _pick_key(hits, lo, match.start(), unit_end, _clause_end(text, unit_end, next_start))
        numbers.append(number)
    _assign_lists(text, numbers)
    return [
        Citation(n.match.group(1), float(n.match.group(1).replace(",", "")), n.unit, n.key, *n.match.span())
        for n in numbers
    ]


def extract_cited_numbers(text: str) -> list[CitedNumber]:
    """The numbers a narrative cites, for `Report.cited_numbers` (see the module docstring for the rules)."""
    return [citation.to_cited_number() for citation in find_citations(text)]


def in_biomarker_unit(citation: Citation, key: str) -> float:
    """The cited value in the biomarker's unit: mm become um for OCT biomarkers, else as written."""
    return citation.value_in_um if BY_KEY[key].unit == "um" else citation.value


def within_rounding(citation: Citation, key: str, truth: float) -> bool:
    """True when `truth`, rounded to the decimals the citation shows, gives the cited value.

    Tolerance: half a unit of the last written decimal (in the written unit), plus 1e-9 for float noise:
    "24.1" agrees with 24.13 and 24.05, "0.720" with 0.7204, "1.82 mm" with 1823 um.
    """
    scale = 1000.0 if citation.unit == "mm" and BY_KEY[key].unit == "um" else 1.0
    tolerance = 0.5 * 10.0**-citation.decimals * scale + 1e-9
    return abs(in_biomarker_unit(citation, key) - truth) <= tolerance


def ground_cited_numbers(text: str, estimates: Mapping[str, float]) -> tuple[str, int]:
    """`text` with every cited number that disagrees with its biomarker's estimate written as the estimate.

    Returns the grounded text and how many numbers were rewritten. Numbers tied to no biomarker, or to one
    without an estimate, stay as written (the benchmark's grounding check still counts them). Millimetres
    stay millimetres (two decimals); other values take the biomarker's usual format (`format_value`).
    """
    pieces, last, rewritten = [], 0, 0
    for citation in find_citations(text):
        key = citation.biomarker_key
        value = estimates.get(key) if key else None
        if value is None or math.isnan(value) or within_rounding(citation, key, value):
            continue
        mm = citation.unit == "mm" and BY_KEY[key].unit == "um"
        pieces += [text[last : citation.start], f"{value / 1000.0:.2f}" if mm else format_value(BY_KEY[key], value)]
        last, rewritten = citation.end, rewritten + 1
    return "".join(pieces) + text[last:], rewritten
