"""How free text names the 37 biomarkers: the alias table and where its aliases occur in a text.

Used by `grok_pacs.analysis.grounding` to tie cited numbers to biomarkers. Alias syntax (lower case):
- tokens may be joined in the text by nothing, spaces, hyphens, slashes, colons ("inl-elm" also matches
  "INL ELM", "is/os" also "ISOS");
- `{a|b|c}` is a choice (the longest that matches is taken);
- `…` stands for up to four `FILLER_WORDS` (connectors and generic nouns, never a qualifier of another
  biomarker, so "venular tortuosity and arterial fractal dimension" cannot read as "venular … fractal
  dimension").
Shared measures: "arterial (1.12) and venular (1.10) tortuosity" or "INL-ELM thickness central 100.2,
inner 90.1 and outer 75.3 um" name two or three biomarkers with one measure word; `DISTRIBUTED` lists the
measures whose qualifiers may stand apart from them, in a list of qualifiers, numbers and connectors.
"""

from __future__ import annotations

import re
from functools import lru_cache

from grok_pacs.domain.biomarkers import BY_KEY

FILLER = "…"
FILLER_WORDS = (
    "the",
    "a",
    "at",
    "in",
    "of",
    "on",
    "for",
    "within",
    "across",
    "from",
    "thickness",
    "thicknesses",
    "layer",
    "layers",
    "subfield",
    "subfields",
    "ring",
    "region",
    "zone",
    "sector",
    "grid",
    "etdrs",
    "macular",
    "retinal",
    "measured",
    "measures",
    "measuring",
    "measurement",
    "value",
    "values",
    "is",
    "was",
    "are",
    "appears",
    "increased",
    "decreased",
    "reduced",
    "elevated",
    "raised",
    "thinned",
    "thickened",
    "mildly",
    "markedly",
    "moderately",
    "slightly",
    "vessel",
    "vessels",
    "vascular",
)
_SEP = r"[\s\-–—/+:]*"
_FILLER_SEP = r"[\s\-–—/:()]+"
_FILLER_RE = rf"(?P<f{{}}>(?:{_FILLER_SEP}(?:{'|'.join(FILLER_WORDS)})){{{{0,4}}}}?{_FILLER_SEP})"

_SIDES = ("inferior", "nasal", "superior", "temporal")
_LAYERS = {
    "inl_elm": "{inl-elm|inl to elm|inner nuclear layer to external limiting membrane}",
    "elm_isos": "{elm-is/os|elm to is/os|elm-ellipsoid zone}",
    "isos_rpe": "{is/os-rpe|is/os to rpe|ellipsoid zone to rpe}",
    "inl_rpe": "{inl-rpe|inl to rpe|inner nuclear layer to rpe}",
}
_REGIONS = {
    "central": "{central|centre|center|foveal}",
    "inner": "inner",
    "outer": "outer",
    "average": "{average|mean|overall|avg}",
}
_ARTERIAL = "{arterial|arteriolar|arteries|arterioles|artery|arteriole}"
_VENULAR = "{venular|venous|venules|veins|venule|vein}"
_TORTUOSITY = "{tortuosity|tortuosities}"
_FRACTAL = "{fractal dimension|fractal dimensions|fd}"


def _layer_aliases() -> dict[str, tuple[str, ...]]:
    """ "<layer> … <region> [subfield]", "<region> [subfield] … <layer>"; the bare layer is its average."""
    table = {}
    for prefix, layer in _LAYERS.items():
        for region, words in _REGIONS.items():
            aliases = (
                f"{layer} {FILLER} {words}",
                f"{layer} {FILLER} {words} subfield",
                f"{words} {FILLER} {layer}",
                f"{words} subfield {FILLER} {layer}",
            )
            table[f"{prefix}_{region}"] = aliases + ((layer,) if region == "average" else ())
    return table


def _vessel_aliases(vessel: str, measure: str) -> tuple[str, ...]:
    return (f"{vessel} {measure}", f"{vessel} {FILLER} {measure}", f"{measure} {FILLER} {vessel}")


def _build_aliases() -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {
        f"mt_{ring}_{side}": (
            f"{ring} {side}",
            f"{ring} {FILLER} {side}",
            f"{side} {FILLER} {ring}",
            f"{ring} {FILLER} {side} {FILLER} macular thickness",
            f"macular thickness {FILLER} {ring} {FILLER} {side}",
        )
        for ring in ("inner", "outer")
        for side in _SIDES
    }
    table.update(_layer_aliases())
    table.update(
        {
            "rpe_average": ("rpe", "retinal pigment epithelium"),
            "disc_diameter_vertical": (
                "{vertical|optic} disc diameter",
                "disc diameter",
                "disc height",
                "vertical diameter of the {disc|optic disc}",
            ),
            "inl_average": ("inl", "inner nuclear layer"),
            "gcipl_average": (
                "{gcipl|gc-ipl|gcl-ipl|gcl+ipl}",
                "ganglion cell-inner plexiform layer",
                "ganglion cell {layer|complex}",
                "ganglion cell",
            ),
            "mt_overall": ("{overall|average|mean|total} {macular|retinal} thickness", "{macular|retinal} thickness"),
            "mt_central": (
                "central subfield",
                "{cst|cmt|crt}",
                "central {macular|retinal|foveal} thickness",
                "foveal thickness",
                f"{{macular|retinal}} thickness {FILLER} central",
                f"{{macular|retinal}} thickness {FILLER} central subfield",
                f"central {FILLER} {{macular|retinal}} thickness",
            ),
            "rnfl_average": ("{rnfl|mrnfl}", "{retinal nerve|nerve} {fibre|fiber} layer"),
            "cup_to_disc": (
                "{vertical cup-to-disc ratio|cup-to-disc ratio|cup-disc ratio|c/d ratio|cup-to-disc}",
                "{cup/disc|c/d|cdr|cup to disc}",
            ),
            "avr": (
                "{arteriolar-to-venular|arteriole-to-venule|arteriovenous|arterio-venous|artery-to-vein} ratio",
                "{a/v ratio|av ratio|avr}",
            ),
            "tortuosity_arterial": _vessel_aliases(_ARTERIAL, _TORTUOSITY),
            "tortuosity_venular": _vessel_aliases(_VENULAR, _TORTUOSITY),
            "fd_arterial": _vessel_aliases(_ARTERIAL, _FRACTAL),
            "fd_venular": _vessel_aliases(_VENULAR, _FRACTAL),
        }
    )
    return table


#: Phrases that name each biomarker in free text, keyed by `grok_pacs.domain.biomarkers` key (all 37 keys).
ALIASES: dict[str, tuple[str, ...]] = _build_aliases()
assert set(ALIASES) == set(BY_KEY), set(BY_KEY) ^ set(ALIASES)

#: Shared measures: (measure, {qualifier choice: biomarker key}).
DISTRIBUTED: tuple[tuple[str, dict[str, str]], ...] = (
    (_TORTUOSITY, {_ARTERIAL: "tortuosity_arterial", _VENULAR: "tortuosity_venular"}),
    (_FRACTAL, {_ARTERIAL: "fd_arterial", _VENULAR: "fd_venular"}),
    *(
        (layer, {words: f"{prefix}_{region}" for region, words in _REGIONS.items()})
        for prefix, layer in _LAYERS.items()
    ),
)


def _phrase_regex(chunk: str) -> str:
    """Regex of a filler-free piece: words joined by `_SEP`, `{a|b}` as a longest-first choice."""
    parts = []
    for token in re.findall(r"\{[^}]*\}|[^\s\-/+{}]+", chunk):
        if token.startswith("{"):
            choices = sorted(token[1:-1].split("|"), key=len, reverse=True)
            parts.append("(?:" + "|".join(_phrase_regex(c) for c in choices) + ")")
        else:
            parts.append(re.escape(token))
    return _SEP.join(parts)


def alias_regex(alias: str) -> str:
    """Word-bounded regex for one alias; filler pieces are groups named f0, f1, ..."""
    pieces = [_phrase_regex(chunk.strip()) for chunk in alias.split(FILLER)]
    body = pieces[0] + "".join(_FILLER_RE.format(i) + piece for i, piece in enumerate(pieces[1:]))
    return r"(?<![a-z0-9])" + body + r"(?![a-z0-9])"


@lru_cache(maxsize=1)
def _compiled() -> tuple[tuple[str, re.Pattern[str]], ...]:
    return tuple((key, re.compile(alias_regex(a), re.IGNORECASE)) for key, aliases in ALIASES.items() for a in aliases)


AliasHit = tuple[int, int, int, str]  #: start, end, specificity (letters spelt out, filler excluded), key


def _letters(text: str) -> int:
    return sum(ch.isalnum() for ch in text)


def alias_hits(text: str) -> list[AliasHit]:
    """Every alias occurrence in `text`, plus the qualifiers of shared measures (`distributed_hits`)."""
    hits = []
    for key, pattern in _compiled():
        for m in pattern.finditer(text):
            filler = sum(_letters(v) for v in m.groupdict().values() if v)
            hits.append((m.start(), m.end(), _letters(m.group()) - filler, key))
    return hits + distributed_hits(text)


_TOKEN_RE = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+|\S")
_LIST_WORDS = frozenset(
    {
        "(",
        ")",
        ",",
        "and",
        "or",
        "&",
        "respectively",
        "um",
        "µm",
        "μm",
        "mm",
        "microns",
        "micrometres",
        "micrometers",
        *FILLER_WORDS,
    }
)


_Qualifiers = tuple[tuple[re.Pattern[str], str], ...]  #: (qualifier pattern, biomarker key)


@lru_cache(maxsize=1)
def _compiled_distributed() -> tuple[tuple[re.Pattern[str], _Qualifiers], ...]:
    return tuple(
        (
            re.compile(alias_regex(measure), re.IGNORECASE),
            tuple((re.compile(alias_regex(q) + "$", re.IGNORECASE), key) for q, key in qualifiers.items()),
        )
        for measure, qualifiers in DISTRIBUTED
    )


def _qualifier_key(word: str, qualifiers: _Qualifiers) -> str | None:
    return next((key for pattern, key in qualifiers if pattern.match(word)), None)


def _scan(side: list[tuple[int, int, str]], qualifiers: _Qualifiers, backward: bool) -> list[tuple[int, int, str, str]]:
    """Qualifiers in the list next to a measure: (start, end, word, key), stopping at any other word.

    Backwards only numbers in parentheses are crossed ("arterial (1.12) and venular (1.10) tortuosity"): a
    bare number there belongs to the name before it ("inner 90.1, ELM-ISOS ...").
    """
    found, depth = [], 0
    for start, end, word in side:
        depth += {")": 1, "(": -1}.get(word, 0) if backward else 0
        key = _qualifier_key(word, qualifiers)
        if key is not None:
            found.append((start, end, word, key))
        elif word[0].isdigit():
            if backward and depth <= 0:
                break
        elif word.lower() not in _LIST_WORDS:
            break
    return found


def distributed_hits(text: str) -> list[AliasHit]:
    """Qualifiers standing apart from their shared measure, each as a hit of (qualifier, measure).

    Their specificity is the qualifier's letters only, so a full alias ending at the same place wins.
    """
    tokens = [(m.start(), m.end(), m.group()) for m in _TOKEN_RE.finditer(text)]
    hits = []
    for measure, qualifiers in _compiled_distributed():
        for m in measure.finditer(text):
            before = [t for t in tokens if t[1] <= m.start()][::-1]
            after = [t for t in tokens if t[0] >= m.end()]
            for start, end, word, key in _scan(before, qualifiers, True) + _scan(after, qualifiers, False):
                hits.append((start, end, _letters(word), key))
    return hits
