"""AMD's subtype as the estimates show it: one criterion for the model's words and for the referral.

Neovascular (wet) AMD is an urgent referral (seen within about 2 weeks, RCOphth) and dry AMD a routine one
(docs/domain.md, Dispositions), so a report must not say one while its measurements show the other. The signs of wet
AMD that the estimates can show, any one of which reads as wet:
- subretinal fluid under the fovea lifts the photoreceptors: central IS/OS-RPE thickness above 75 um (the
  stage-1 teacher's `wet_if` in training/data/eye_guideline.yaml, held to this by a test);
- central thickening over the lesion: central subfield thickness of 300 um or more.
On the phantom cohort of seed 7 either sign alone separates its 48 wet from its 72 dry AMD eyes (true values:
dry eyes at most 63 um and 293 um, wet eyes at least 107 um and 329 um).

Used by the prompt (the pattern line names the subtype with the label: "Closest biomarker pattern: AMD
(dry)."), by the narrative validator (a narrative naming the subtype the estimates contradict is withheld)
and by the default disposition table (one urgent row per sign).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass

from grok_pacs.domain.biomarkers import BY_KEY

#: The comparisons a sign (or a disposition table row) may make.
COMPARISONS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


@dataclass(frozen=True)
class Sign:
    """One measurable sign: `key op value` (e.g. isos_rpe_central > 75.0) and what it means in the eye."""

    key: str
    op: str
    value: float
    meaning: str

    def __post_init__(self) -> None:
        if self.key not in BY_KEY or self.op not in COMPARISONS:
            raise ValueError(f"sign: unknown biomarker {self.key!r} or operator {self.op!r}")

    def shown(self, estimates: Mapping[str, float]) -> bool | None:
        """True or False from the estimate; None when the biomarker was not estimated."""
        value = estimates.get(self.key)
        if value is None or math.isnan(float(value)):
            return None
        return bool(COMPARISONS[self.op](float(value), self.value))

    def describe(self, estimates: Mapping[str, float]) -> str:
        """Evidence for a message: 'ISOS-RPE thickness: central subfield 56.0 (wet > 75)', or 'not measured'."""
        value = "not measured" if self.shown(estimates) is None else f"{float(estimates[self.key]):.1f}"
        return f"{BY_KEY[self.key].name} {value} (wet {self.op} {self.value:g})"


WET_AMD_SIGNS: tuple[Sign, ...] = (
    Sign("isos_rpe_central", ">", 75.0, "subretinal fluid under the fovea"),
    Sign("mt_central", ">=", 300.0, "central thickening"),
)

#: The words that state a subtype, as the narrative validator splits words (lower case; "non-neovascular" is one
#: word). A cue right after a negation in its clause ("no subretinal fluid") states nothing.
SUBTYPE_CUES: dict[str, tuple[tuple[str, ...], ...]] = {
    "wet": (
        ("wet",),
        ("neovascular",),
        ("neovascularisation",),
        ("neovascularization",),
        *(("subretinal", w) for w in ("fluid", "haemorrhage", "haemorrhages", "hemorrhage", "hemorrhages")),
    ),
    "dry": (("dry",), ("non-neovascular",), ("geographic", "atrophy")),
}
NEGATIONS = frozenset({"no", "not", "nor", "without", "free", "absence", "absent"})
NEGATION_REACH = 6  #: words before a cue, inside its clause, that a negation reaches ("no drusen, ... or <cue>")

WORD = re.compile(r"[a-z0-9]+(?:[.'-][a-z0-9]+)*")  #: the validator's words
_CLAUSE_END = re.compile(r"[.;:!?](?:\s|$)")


def clause_words(text: str) -> list[list[str]]:
    """The words of each clause of `text` (lower case): a negation reaches no further than its clause."""
    return [WORD.findall(clause) for clause in _CLAUSE_END.split(text.lower())]


def _negated(words: list[str], start: int) -> bool:
    return any(word in NEGATIONS for word in words[max(0, start - NEGATION_REACH) : start])


def amd_subtype(estimates: Mapping[str, float]) -> str | None:
    """'wet' when any sign shows, 'dry' when every sign's biomarker was estimated and none shows, else None."""
    shown = [sign.shown(estimates) for sign in WET_AMD_SIGNS]
    if any(shown):
        return "wet"
    return "dry" if all(s is False for s in shown) else None


def stated_subtypes(text: str) -> dict[str, str]:
    """Subtype -> the first cue in `text` that states it (negated cues ignored)."""
    found: dict[str, str] = {}
    for words in clause_words(text):
        for i in range(len(words)):
            for subtype, cues in SUBTYPE_CUES.items():
                for cue in cues:
                    if subtype not in found and tuple(words[i : i + len(cue)]) == cue and not _negated(words, i):
                        found[subtype] = " ".join(cue)
    return found
