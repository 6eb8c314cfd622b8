"""The guideline teacher: a deterministic report writer driven by the biomarkers, the label and the Eye-Guideline.

It follows the prompt rules of docs/domain.md, The GROK model (stage 1): biomarker assessment (numbers tied to
findings) -> sub-inference
-> integration -> the other labels ruled out one at a time, each with a finding -> a concluding sentence
naming the diagnosis; one paragraph of at most 300 words; never a hint that the label was given.
Numbers are written with grok_pacs.domain.biomarkers.format_value right after a name that
grok_pacs.analysis.grounding ties to that biomarker, so a grounding check can match every number.

A concise report (`write(record, concise=True)`, for CPU presets whose small stand-in LLM must learn the form
in one short epoch) is the same quantitative-to-qualitative chain in about 60 words instead of 250: every
key estimate outside its normal range (as the compact prompt flags them), the visible lesions, the
sub-inference and the conclusion; no coverage, integration or rule-out sentences (the long differential a
small model learns to loop on), and the label shows only after the evidence is written.

Variety: which signs are cited, sentence templates, the order of blocks and of the rule-outs all vary per
eye (seeded by subject and eye, so the same record always gets the same report): a student must learn
the reasoning, not one sentence.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from typing import Protocol

from grok_pacs.domain.biomarkers import BIOMARKERS, BY_KEY, CFP_KEYS, PROSE_NAMES, format_value
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label
from grok_pacs.model.prompt import COMPACT_KEYS, flag
from training.stage1.teachers.knowledge import MIN_GROUNDED_NUMBERS, NOT_MEASURED, Knowledge, Sign, load_knowledge

MAX_WORDS = 300

#: How the report names each biomarker: phrases grok_pacs.analysis.grounding ties to that key.
PROSE: dict[str, str] = PROSE_NAMES
_REGION = {
    "cup_to_disc": "disc",
    "disc_diameter_vertical": "disc",
    "avr": "vessels",
    "tortuosity_arterial": "vessels",
    "tortuosity_venular": "vessels",
    "fd_arterial": "vessels",
    "fd_venular": "vessels",
}
_STATUS = {
    "low": ("reduced", "below the normal range", "low"),
    "high": ("increased", "above the normal range", "raised"),
    "low-normal": ("at the lower limit of normal", "low-normal"),
    "high-normal": ("at the upper limit of normal", "high-normal"),
    "normal": ("within normal limits", "in the normal range", "normal"),
}
_AGAINST = {
    "high": ("normal", "low-normal", "low"),
    "low": ("normal", "high-normal", "high"),
    "normal": ("low", "high"),
}
#: How a subtyped label's lesions are introduced (the subtype word first: what the prompt's pattern line names).
_KINDS = {"dry": "dry, non-exudative changes", "wet": "wet, exudative changes"}
_SUPPORTS = {
    "high": ("high", "high-normal"),
    "low": ("low", "low-normal"),
    "normal": ("normal", "low-normal", "high-normal"),
}


#: Coverage sentences: region -> (openers, first key, pool of further keys, how many from the pool).
_COVERAGE: dict[str, tuple[tuple[str, ...], str, list[str], int]] = {
    "disc": (("The optic disc has ", "At the optic disc there is "), "cup_to_disc", ["disc_diameter_vertical"], 1),
    "macula": (("The fovea has ", "At the macula there is "), "mt_central", ["mt_overall", "mt_inner_temporal"], 1),
    "vessels": (
        ("The vessels show ", "The vascular tree has "),
        "avr",
        ["tortuosity_arterial", "tortuosity_venular", "fd_arterial", "fd_venular"],
        2,
    ),
    "layers": (
        ("The OCT layers show ", "On OCT there is "),
        "rnfl_average",
        ["gcipl_average", "rpe_average", "inl_average"],
        2,
    ),
}


class EyeRecord(Protocol):
    subject_id: str
    eye: str
    label: Label
    biomarkers: Mapping[str, float]
    meta: Mapping[str, str]


def _region(key: str) -> str:
    if key in _REGION:
        return _REGION[key]
    return "macula" if key.startswith("mt_") else "layers"


def _value(key: str, value: float) -> str:
    b = BY_KEY[key]
    return format_value(b, value) + (" µm" if b.unit == "um" else "")


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _a(phrase: str) -> str:
    """The phrase with its indefinite article ("an RNFL thickness", "a venular tortuosity")."""
    first = phrase.split()[0]
    vowel_sound = first[0].lower() in "aeio" or (first.isupper() and first[0] in "AEFHILMNORSX")
    return ("an " if vowel_sound else "a ") + phrase


class GuidelineTeacher:
    """Writes one report paragraph per eye from its biomarkers and label (no model, no network)."""

    name = "guideline"

    def __init__(self, knowledge: Knowledge | None = None) -> None:
        self.knowledge = knowledge or load_knowledge()

    def write(self, record: EyeRecord, *, concise: bool = False) -> str:
        """The report paragraph; `concise`: assessment, lesions, sub-inference and conclusion only."""
        seed = hashlib.sha256(f"{record.subject_id}|{record.eye}|{record.label.value}".encode()).digest()
        writer = _Writer(self.knowledge, record, random.Random(int.from_bytes(seed[:8], "big")))
        return writer.concise() if concise else writer.paragraph()


class _Writer:
    """One report: holds the record, the randomness and what has been said."""

    def __init__(self, knowledge: Knowledge, record: EyeRecord, rng: random.Random) -> None:
        self.k, self.rng = knowledge, rng
        self.label = record.label
        self.lk = knowledge.labels[record.label]
        self.values = {key: float(record.biomarkers.get(key, math.nan)) for key in BY_KEY}
        self.subtype = self._subtype(record)
        self.used_keys: set[str] = set()

    def _subtype(self, record: EyeRecord) -> str:
        given = (getattr(record, "meta", None) or {}).get("subtype", "")
        if given in self.lk.lesions or given in self.lk.conclusion:
            return given
        if self.lk.wet_if:
            key, above = self.lk.wet_if
            return "wet" if self.values[key] > above else "dry"
        if self.label == Label.DIABETIC_RETINOPATHY:
            return "dme" if self.k.status("mt_central", self.values["mt_central"]) == "high" else "npdr"
        return ""

    def status(self, key: str) -> str:
        return self.k.status(key, self.values[key])

    def cite(self, key: str) -> str:
        """'a/an <name> of <value>' (or a semi-quantitative phrase when the value is missing)."""
        self.used_keys.add(key)
        if math.isnan(self.values[key]):
            return f"{_a(PROSE[key])} that could not be measured"
        return f"{_a(PROSE[key])} of {_value(key, self.values[key])}"

    def the(self, key: str) -> str:
        """'the <name> of <value>'."""
        return "the " + self.cite(key).split(" ", 1)[1]

    # --- blocks -------------------------------------------------------------------------------------
    def paragraph(self) -> str:
        assess = self.assessment()
        lesion = self.lesions()
        coverage = self.coverage()
        middle = [self.sub_inference(), self.integration()]
        rule_outs = self.rule_outs()
        conclusion = self.conclusion()
        first = assess + [lesion] if self.rng.random() < 0.6 else [lesion] + assess
        optional = coverage
        while True:
            sentences = [self.measured()] + first + optional + middle + rule_outs + [conclusion]
            text = " ".join(s for s in sentences if s)
            if len(text.split()) <= MAX_WORDS or not optional:
                return text
            optional = optional[:-1]  # the least needed coverage sentence goes first

    def concise(self) -> str:
        """Quantitative first, then qualitative: every key estimate outside its normal range (in the order
        and with the flags the compact prompt gives them, so writing them is copying), then the visible
        lesions, what they mean and the conclusion. The label first shows after the evidence is written."""
        blocks = (self.measured(), self.flagged(), self.lesions(), self.sub_inference(), self.conclusion())
        return " ".join(s for s in blocks if s)

    def measured(self) -> str:
        """For an eye with fewer than MIN_GROUNDED_NUMBERS measured values (an export's eye without its
        measurements): every value it has and what was not measured; "" otherwise."""
        have = [b.key for b in BIOMARKERS if not math.isnan(self.values[b.key])]
        if len(have) >= MIN_GROUNDED_NUMBERS:
            return ""
        if not have:
            return f"The biomarkers were {NOT_MEASURED} for this eye, so the reading rests on the images."
        self.used_keys.update(have)
        verb = "was" if len(have) == 1 else "were"
        return (
            f"Only {_and([self.the(k) for k in have])} {verb} measured; "
            f"the other biomarkers were {NOT_MEASURED}."  # no count: a bare number would read as a citation
        )

    def flagged(self) -> str:
        keys = [b.key for b in BIOMARKERS if b.key in COMPACT_KEYS and not math.isnan(self.values[b.key])]
        outside = [k for k in keys if flag(BY_KEY[k], self.values[k])]
        if not outside:
            shown = [k for k in ("cup_to_disc", "mt_central", "avr") if k in keys]
            if not shown:
                return "All key estimates are within normal limits."
            return "All key estimates are within normal limits, with " + _and([self.the(k) for k in shown]) + "."
        flags = [f"{self.the(k)} ({flag(BY_KEY[k], self.values[k])})" for k in outside]
        return "The key estimates outside the normal range are " + _and(flags) + "."

    def _signs(self) -> list[tuple[Sign, bool]]:
        """Signature signs with whether the value supports them; supporting ones first."""
        signs = [
            (s, self.status(s.key) in _SUPPORTS[s.direction] or math.isnan(self.values[s.key]))
            for s in self.lk.signature
        ]
        supporting = [x for x in signs if x[1]]
        other = [x for x in signs if not x[1]]
        self.rng.shuffle(supporting)
        return supporting + other

    def assessment(self) -> list[str]:
        signs = self._signs()[: self.rng.choice((2, 3, 3))]
        return [self._assess(sign, supports) for sign, supports in signs]

    def _assess(self, sign: Sign, supports: bool) -> str:
        key, finding = sign.key, sign.finding
        where = "fundus photograph" if key in CFP_KEYS else "OCT"
        if math.isnan(self.values[key]):
            self.used_keys.add(key)
            estimate = {"high": "clearly above", "low": "clearly below", "normal": "within"}[sign.direction]
            return (
                f"The {PROSE[key]} is not available, but the {where} shows {finding}, "
                f"a semi-quantitative estimate {estimate} the normal range."
            )
        status = self.rng.choice(_STATUS[self.status(key)])
        if not supports:
            return f"{_cap(self.the(key))} is {status}, so {finding} is not a prominent feature here."
        templates = (
            f"The {where} shows {finding}, with {self.cite(key)}, {status}.",
            f"{_cap(finding)} can be seen, and the {PROSE[key]} is {status} at {_value(key, self.values[key])}.",
            f"{_cap(self.cite(key))}, {status}, matches {finding}.",
            f"On the {where}, {self.the(key)} ({status}) reflects {finding}.",
        )
        self.used_keys.add(key)
        return self.rng.choice(templates)

    def lesions(self) -> str:
        items = self.lk.lesions.get(self.subtype) or self.lk.lesions.get("") or ()
        if not items:
            return ""
        # AMD's subtype is named before its lesions ("dry, non-exudative changes: soft yellow drusen ..."):
        # the model then writes the prompt's "AMD (dry)" as its first lesion word and the lesions follow it,
        # where a 135M model given the lesions alone chose wet ones over a dry eye's estimates.
        kind = f"{_KINDS[self.subtype]}: " if self.lk.wet_if and self.subtype in _KINDS else ""
        if len(items) == 1:
            return self.rng.choice((f"The images show {kind}{items[0]}.", f"Inspection reveals {kind}{items[0]}."))
        return self.rng.choice(
            (
                f"The images show {kind}{items[0]}, with {items[1]}.",
                f"Inspection reveals {kind}{items[0]}, together with {items[1]}.",
            )
        )

    def coverage(self) -> list[str]:
        """Sentences for the regions the assessment has not covered (disc, macula, vessels, layers, periphery)."""
        covered = {_region(k) for k in self.used_keys}
        regions = [r for r in _COVERAGE if r not in covered]
        self.rng.shuffle(regions)
        out = [s for s in (self._cover(r) for r in regions) if s]
        out.insert(self.rng.randrange(len(out) + 1), self.lk.periphery)
        return out

    def _cover(self, region: str) -> str:
        """'<opener> a X of v (status), a Y of v and a Z of v.' from the region's measured biomarkers."""
        openers, first, pool, n = _COVERAGE[region]
        keys = [first] + self.rng.sample(pool, min(n, len(pool)))
        keys = [k for k in keys if not math.isnan(self.values[k])]
        if not keys:
            return ""
        cites = [self.cite(k) for k in keys]
        cites[0] += f" ({self.rng.choice(_STATUS[self.status(keys[0])])})"
        listed = cites[0] if len(cites) == 1 else ", ".join(cites[:-1]) + " and " + cites[-1]
        return self.rng.choice(openers) + listed + "."

    def sub_inference(self) -> str:
        inference = self.rng.choice(self.lk.inference)
        return self.rng.choice(
            (
                f"These signs point to {inference}.",
                f"This combination suggests {inference}.",
                f"The pattern indicates {inference}.",
            )
        )

    def integration(self) -> str:
        findings = [s.finding for s, ok in self._signs() if ok][:2]
        if len(findings) < 2:
            return "Integrating the photograph with the OCT, the structural and vascular findings agree."
        a, b = findings
        return self.rng.choice(
            (
                f"Integrating the photograph with the OCT, {a} and {b} form one consistent picture.",
                f"Taken together, {a} and {b} reinforce each other across both modalities.",
            )
        )

    def rule_outs(self) -> list[str]:
        others = [lab for lab in DIAGNOSTIC_LABELS if lab != self.label]
        self.rng.shuffle(others)
        clauses = [self._rule_out(other) for other in others]
        split = self.rng.choice((2, 3, 4))
        groups = [clauses[:split], clauses[split:]]
        openers = ("", "Among the alternatives, ", "Considering the differential, ", "Regarding other conditions, ")
        return [_cap(self.rng.choice(openers) + "; ".join(g)) + "." for g in groups if g]

    def _rule_out(self, other: Label) -> str:
        ok = self.k.labels[other]
        name = "a normal eye" if other == Label.NORMAL else self.rng.choice(ok.terms)
        if other == Label.NORMAL:
            sign = next((s for s, sup in self._signs() if sup and not math.isnan(self.values[s.key])), None)
            if sign is None:
                return f"{name} is excluded by {self.rng.choice(self.lk.lesions.get('', ('the findings above',)))}"
            status = self.rng.choice(_STATUS[self.status(sign.key)])
            return f"{name} is excluded by {self.the(sign.key)}, which is {status}"
        against = [
            s
            for s in ok.signature
            if not math.isnan(self.values[s.key]) and self.status(s.key) in _AGAINST[s.direction]
        ]
        override = self.k.overrides.get(self.label, {}).get(other)
        if override:
            return f"{name} is unlikely because {override}"
        if not against:
            return f"{name} is unlikely in view of {ok.rule_out}"
        cited = self.cite(self.rng.choice(against).key)
        return self.rng.choice(
            (
                f"{name} is unlikely in view of {ok.rule_out} and {cited}",
                f"{name} is not supported, with {ok.rule_out} and {cited}",
                f"there is no evidence of {name}, with {ok.rule_out}",
                f"{name} is unlikely with {cited}",
            )
        )

    def conclusion(self) -> str:
        phrases = self.lk.conclusion.get(self.subtype) or self.lk.conclusion[""]
        term = self.rng.choice(phrases)
        return self.rng.choice(
            (
                f"Overall, the findings are most consistent with {term}.",
                f"The diagnosis is therefore {term}.",
                f"In conclusion, the evidence supports {term}.",
            )
        )
