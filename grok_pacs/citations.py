"""Numbers a report narrative cites, each tied to the biomarker it describes (SPEC §2).

Why one module: the runtime fills `Report.cited_numbers` with `extract_cited_numbers` and the benchmark
(`training.benchmark`) scores the very same extraction, so a report is read one way everywhere.

What is a cited number: a number written as a value ("0.720", "24.1 µm", "1,820 um", "1.82 mm",
"150/95 mmHg"). What is not (skipped, documented in `_skip_reason`): digits inside identifiers ("H35.3",
"ICD-10", "3D", "1st"), scan dimensions ("6 x 6 mm"), reference ranges and thresholds ("normal 25-35",
"between 0.2 and 0.5", "above 0.6", "threshold of 0.65"), percentages (relative claims, not values) and
counts of things ("3 quadrants", "2 disc diameters", "4 microaneurysms").

How a number is tied to a biomarker: every alias of `ALIASES` (lower case; tokens may be joined by
nothing, spaces, hyphens or slashes; `…` stands for up to four filler words) is searched in the text.
The number takes the alias that ends nearest before it, within its clause (not past the previous number
or the sentence start); among aliases ending at the same place the one spelling out most letters (the
most specific) wins, so "INL-ELM central subfield" beats "central subfield". `…` matches only
`FILLER_WORDS` (connectors, generic nouns), never another biomarker's qualifier. Only when nothing precedes it, an alias that starts
just after it ("0.72 cup-to-disc ratio") is used. A number with a non-length unit (mmHg, years, °) is
never tied to a biomarker. Values whose unit is a length are kept as written; `Citation.value_in_um`
converts millimetres.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from grok_pacs.biomarkers import BY_KEY, CFP_KEYS
from grok_pacs.report import CitedNumber

FILLER = "…"
_SEP = r"[\s\-–—/+:]*"
#: Words `…` may stand for: connectors and generic nouns only, never a qualifier of another biomarker,
#: so "venular tortuosity and arterial fractal dimension" cannot read as "venular … fractal dimension".
FILLER_WORDS = (
    "the", "a", "at", "in", "of", "on", "for", "within", "across", "from", "thickness", "thicknesses", "layer",
    "layers", "subfield", "subfields", "ring", "region", "zone", "sector", "grid", "etdrs", "macular", "retinal",
    "measured", "measures", "measuring", "measurement", "value", "values", "is", "was", "are", "appears",
    "increased", "decreased", "reduced", "elevated", "raised", "thinned", "thickened", "mildly", "markedly",
    "moderately", "slightly", "vessel", "vessels", "vascular",
)
_FILLER_SEP = r"[\s\-–—/:()]+"
_FILLER_RE = rf"(?:{_FILLER_SEP}(?:{'|'.join(FILLER_WORDS)})){{0,4}}?{_FILLER_SEP}"

_SIDES = ("inferior", "nasal", "superior", "temporal")
_RINGS = ("inner", "outer")
_LAYER_NAMES = {
    "inl_elm": ("inl-elm", "inl to elm", "inner nuclear layer to external limiting membrane"),
    "elm_isos": ("elm-is/os", "elm to is/os", "elm-ellipsoid zone"),
    "isos_rpe": ("is/os-rpe", "is/os to rpe", "ellipsoid zone to rpe"),
    "inl_rpe": ("inl-rpe", "inl to rpe", "inner nuclear layer to rpe"),
}
_REGION_WORDS = {
    "central": ("central", "centre", "center", "foveal"),
    "inner": ("inner",),
    "outer": ("outer",),
    "average": ("average", "mean", "overall", "avg"),
}
_ARTERIAL = ("arterial", "arteriolar", "arteries", "arterioles", "artery", "arteriole")
_VENULAR = ("venular", "venous", "venules", "veins", "venule", "vein")


def _layer_aliases(prefix: str) -> dict[str, tuple[str, ...]]:
    """Aliases of one OCT layer group: "<layer> … <region>", "<region> … <layer>", bare layer = average."""
    table: dict[str, tuple[str, ...]] = {}
    for region, words in _REGION_WORDS.items():
        pairs = [(name, word) for name in _LAYER_NAMES[prefix] for word in words]
        aliases = [f"{n} {FILLER} {w}{s}" for n, w in pairs for s in ("", " subfield")]
        aliases += [f"{w}{s} {FILLER} {n}" for n, w in pairs for s in ("", " subfield")]
        if region == "average":
            aliases += list(_LAYER_NAMES[prefix])
        table[f"{prefix}_{region}"] = tuple(aliases)
    return table


def _vessel_aliases(words: tuple[str, ...], measure: tuple[str, ...]) -> tuple[str, ...]:
    """"arteriolar tortuosity", "tortuosity of the arterioles", ... for one vessel kind and measure."""
    return tuple(f"{w} {FILLER} {m}" for w in words for m in measure) + tuple(
        f"{w} {m}" for w in words for m in measure
    ) + tuple(f"{m} {FILLER} {w}" for w in words for m in measure)


def _build_aliases() -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {
        f"mt_{ring}_{side}": (f"{ring} {side}", f"{ring} {FILLER} {side}", f"{side} {FILLER} {ring}",
                              f"{ring} {FILLER} {side} {FILLER} macular thickness",
                              f"macular thickness {FILLER} {ring} {FILLER} {side}")
        for ring in _RINGS
        for side in _SIDES
    }
    for prefix in _LAYER_NAMES:
        table.update(_layer_aliases(prefix))
    table.update({
        "rpe_average": ("rpe", "retinal pigment epithelium"),
        "disc_diameter_vertical": ("vertical disc diameter", "disc diameter", "optic disc diameter",
                                   "vertical diameter of the disc", "vertical diameter of the optic disc",
                                   "disc height"),
        "inl_average": ("inl", "inner nuclear layer"),
        "gcipl_average": ("gcipl", "gc-ipl", "gcl-ipl", "gcl+ipl", "ganglion cell-inner plexiform layer",
                          "ganglion cell layer", "ganglion cell complex", "ganglion cell"),
        "mt_overall": ("overall macular thickness", "average macular thickness", "mean macular thickness",
                       "total macular thickness", "overall retinal thickness", "average retinal thickness",
                       "mean retinal thickness", "macular thickness", "retinal thickness"),
        "mt_central": ("central subfield", "cst", "cmt", "crt", "central macular thickness",
                       "central retinal thickness", "central foveal thickness", "foveal thickness",
                       f"macular thickness {FILLER} central", f"macular thickness {FILLER} central subfield",
                       f"retinal thickness {FILLER} central", f"retinal thickness {FILLER} central subfield",
                       f"central {FILLER} macular thickness", f"central {FILLER} retinal thickness"),
        "rnfl_average": ("rnfl", "retinal nerve fibre layer", "retinal nerve fiber layer",
                         "nerve fibre layer", "nerve fiber layer", "mrnfl"),
        "cup_to_disc": ("cup-to-disc ratio", "cup-to-disc", "cup/disc", "cup-disc ratio", "c/d ratio", "c/d",
                        "cdr", "vertical cup-to-disc ratio", "cup to disc"),
        "avr": ("arteriolar-to-venular ratio", "arteriole-to-venule ratio", "arteriovenous ratio",
                "arterio-venous ratio", "artery-to-vein ratio", "a/v ratio", "av ratio", "avr"),
        "tortuosity_arterial": _vessel_aliases(_ARTERIAL, ("tortuosity",)),
        "tortuosity_venular": _vessel_aliases(_VENULAR, ("tortuosity",)),
        "fd_arterial": _vessel_aliases(_ARTERIAL, ("fractal dimension", "fd")),
        "fd_venular": _vessel_aliases(_VENULAR, ("fractal dimension", "fd")),
    })
    return table


#: Phrases that name each biomarker in free text, keyed by `grok_pacs.biomarkers` key (all 37 keys).
ALIASES: dict[str, tuple[str, ...]] = _build_aliases()
assert set(ALIASES) == set(BY_KEY), set(BY_KEY) ^ set(ALIASES)


def _alias_regex(alias: str) -> str:
    """Regex for one alias: tokens joined by optional separators, `…` as filler words, word-bounded."""
    parts = []
    for chunk in alias.split(FILLER):
        tokens = [t for t in re.split(r"[\s\-/+]+", chunk.strip()) if t]
        parts.append(_SEP.join(re.escape(t) for t in tokens))
    return r"(?<![a-z0-9])" + _FILLER_RE.join(parts) + r"(?![a-z0-9])"


def _specificity(alias: str) -> int:
    """Letters an alias spells out (filler excluded): the longer, the more specific."""
    return sum(ch.isalnum() for ch in alias.replace(FILLER, ""))


@lru_cache(maxsize=1)
def _compiled_aliases() -> tuple[tuple[str, re.Pattern[str], int], ...]:
    return tuple(
        (key, re.compile(_alias_regex(alias), re.IGNORECASE), _specificity(alias))
        for key, aliases in ALIASES.items()
        for alias in aliases
    )


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
    r"(?:\bnormal|\breference|\bexpected|\btypical(?:ly)?|\busual(?:ly)?|\bthreshold|\bcut-?off|\blimits?|"
    r"\branges?|[<>≤≥]|\babove|\bbelow|\bunder|\bover|\bexceed(?:ing|s)?|\bgreater than|\bless than|"
    r"\bmore than|\bup to|\bat least|\bat most)"
    r"(?:[\s:=(~]+(?:range|limits?|values?|of|is|are|being|around|about|the|a|for|adults?)\b)*[\s:=(~]*$",
    re.IGNORECASE,
)
_BOUNDARY_RE = re.compile(r"[.!?](?=\s|$)|[;\n]")


def _skip_reason(text: str, match: re.Match[str]) -> str | None:
    """Why the number at `match` is not a cited value (None when it is one)."""
    start, end = match.span()
    before, after = text[max(0, start - 60):start], text[end:end + 40]
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


_AliasHit = tuple[int, int, int, str]  # start, end, specificity, biomarker key


def _alias_matches(text: str) -> list[_AliasHit]:
    """Every alias occurrence in the text."""
    found = []
    for key, pattern, specificity in _compiled_aliases():
        found.extend((m.start(), m.end(), specificity, key) for m in pattern.finditer(text))
    return found


def _clause_start(text: str, start: int, previous_end: int) -> int:
    """Where the clause of a number begins: after the previous number, sentence boundary or 160 chars."""
    boundaries = [m.end() for m in _BOUNDARY_RE.finditer(text, 0, start)]
    return max([previous_end, start - 160, *boundaries[-1:]])


def _clause_end(text: str, end: int, next_start: int) -> int:
    """Where the text a number may look ahead into ends: next number, comma, sentence end or 40 chars."""
    stop = re.compile(r"[,.;:!?\n(]").search(text, end)
    return min(next_start, end + 40, stop.start() if stop else len(text))


def _pick_key(aliases: list[_AliasHit], lo: int, start: int, end: int, hi: int) -> str | None:
    """The alias ending nearest before the number (most specific on ties); else the first just after it."""
    before = [a for a in aliases if lo <= a[0] and a[1] <= start]
    if before:
        return max(before, key=lambda a: (a[1], a[2]))[3]
    after = [a for a in aliases if end <= a[0] and a[1] <= hi]
    return min(after, key=lambda a: (a[0], -a[2]))[3] if after else None


def find_citations(text: str) -> list[Citation]:
    """All cited numbers in `text`, in order, each with its unit and biomarker key (or None)."""
    numbers = [m for m in _NUMBER_RE.finditer(text) if _skip_reason(text, m) is None]
    aliases = _alias_matches(text)
    citations: list[Citation] = []
    previous_end = 0
    for index, match in enumerate(numbers):
        unit, unit_end = _unit_after(text, match.end())
        next_start = numbers[index + 1].start() if index + 1 < len(numbers) else len(text)
        key = None
        if unit != "other":
            lo = _clause_start(text, match.start(), previous_end)
            key = _pick_key(aliases, lo, match.start(), unit_end, _clause_end(text, unit_end, next_start))
        written = match.group(1)
        citations.append(Citation(written, float(written.replace(",", "")), unit, key, *match.span()))
        previous_end = unit_end
    return citations


def extract_cited_numbers(text: str) -> list[CitedNumber]:
    """The numbers a narrative cites, for `Report.cited_numbers` (see the module docstring for the rules)."""
    return [citation.to_cited_number() for citation in find_citations(text)]


def is_ratio(key: str) -> bool:
    """True for the unitless CFP biomarkers (a length unit on them is a wrong unit)."""
    return key in CFP_KEYS
