"""The validator every generation passes before its words reach a report (issue 14).

`validate_narrative(text, estimates)` reads the model's whole generation (findings paragraph, then
`Diagnosis: <Label>`) and returns a `NarrativeCheck`: `passed`, and one `Issue` per problem found, each
with a coded `Reason` and a human sentence. It never raises on any string.

Rules (limits in `ValidationLimits`, defaults set on the phantom teacher reports, where the worst healthy
report repeats a 4-word phrase 4 times and an 8-word phrase twice, and runs to 295 words):
- repeated sentence: the same sentence (case and spacing ignored) twice;
- repeated phrase: a phrase of 3 or more words written twice in a row, a 4-word phrase more than 5 times,
  or an 8-word phrase more than twice;
- malformed number: a second decimal point inside a number ("0.375.0.0") or a digit run longer than
  `max_digits` ("0.3750000000");
- missing diagnosis line, or one that names no valid label (or several);
- length: fewer than `min_words` or more than `max_words` words of findings;
- implausible value: a cited number outside its biomarker's plausible range
  (`grok_pacs.domain.biomarkers`);
- unmeasured value: a number cited for a biomarker without an estimate (only when `estimates` is given),
  e.g. an OCT thickness for an eye without OCT: the model made it up;
- contradicts the estimates: a narrative that concludes AMD names wet AMD (or its signs: subretinal fluid,
  neovascular) while the estimates show dry, or the reverse (`grok_pacs.domain.subtypes`, the criterion the
  referral reads), e.g. "a dark subretinal haemorrhage" over a central IS/OS-RPE thickness of 56 um (only
  with `estimates`; other labels are left alone: "neovascularisation" of the disc is diabetic retinopathy);
- contradicts its diagnosis: the concluding sentence names one label and the diagnosis line another
  ("... the evidence supports hypertensive retinopathy." then "Diagnosis: AMD"): findings that argue for
  one label under a coded diagnosis of another must not reach a clinician. A concluding sentence naming
  several labels or none is left alone (the stage-1 reports the model learned from name exactly one).
A failed check means the narrative is withheld; what the runtime does then is in `engine`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from grok_pacs.analysis.grounding import find_citations, in_biomarker_unit
from grok_pacs.analysis.parsing import label_from_text, parse_generation
from grok_pacs.analysis.result import REASON_TEXT, NarrativeCheck, NarrativeIssue, NarrativeReason
from grok_pacs.domain.biomarkers import BY_KEY
from grok_pacs.domain.labels import Label
from grok_pacs.domain.subtypes import WET_AMD_SIGNS, WORD, amd_subtype, stated_subtypes

__all__ = ["REASON_TEXT", "Issue", "NarrativeCheck", "Reason", "ValidationLimits", "validate_narrative"]

#: Short names (the types live in `result`, beside the Report that carries them).
Reason = NarrativeReason
Issue = NarrativeIssue


@dataclass(frozen=True)
class ValidationLimits:
    """Thresholds of the validator; the defaults are documented in the module docstring."""

    min_words: int = 8  # fewer words of findings is not a report
    max_words: int = 450  # the paper's reports are <= 300 words; 450 leaves room, a runaway exceeds it
    short_phrase_words: int = 4  # a phrase of this many words ...
    short_phrase_max: int = 5  # ... may occur at most this often
    long_phrase_words: int = 8  # a phrase of this many words ...
    long_phrase_max: int = 2  # ... may occur at most this often
    back_to_back_words: int = 3  # a phrase of >= this many words twice in a row (none in 280 teacher reports)
    max_digits: int = 6  # longest digit run in a number (4000.0 um is the largest plausible value: 5)

    def __post_init__(self) -> None:
        for name in (
            "min_words",
            "max_words",
            "short_phrase_words",
            "short_phrase_max",
            "long_phrase_words",
            "long_phrase_max",
            "back_to_back_words",
            "max_digits",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"ValidationLimits.{name} must be >= 1, got {getattr(self, name)}")
        if self.min_words > self.max_words:
            raise ValueError(f"ValidationLimits: min_words {self.min_words} > max_words {self.max_words}")


_WORD = WORD
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_SECOND_POINT = re.compile(r"\d+\.\d+\.\d[\d.]*")  # 0.375.0.0; "0.72. The" (a sentence end) is fine


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _back_to_back(words: list[str], shortest: int) -> str | None:
    """The first phrase of `shortest`..40 words that is immediately written again ("x y z x y z"), if any
    (longer blocks written twice are caught as repeated sentences or 8-word phrases)."""
    for size in range(shortest, min(40, len(words) // 2) + 1):
        for i in range(len(words) - 2 * size + 1):
            if words[i : i + size] == words[i + size : i + 2 * size]:
                return " ".join(words[i : i + size])
    return None


def _repeats(words: list[str], limits: ValidationLimits) -> list[Issue]:
    twice = _back_to_back(words, limits.back_to_back_words)
    if twice is not None:
        return [Issue(Reason.REPEATED_PHRASE, f"{_short(twice)} twice in a row")]
    issues = []
    for size, most in (
        (limits.long_phrase_words, limits.long_phrase_max),
        (limits.short_phrase_words, limits.short_phrase_max),
    ):
        counts = Counter(tuple(words[i : i + size]) for i in range(len(words) - size + 1))
        if counts:
            phrase, count = counts.most_common(1)[0]
            if count > most:
                issues.append(Issue(Reason.REPEATED_PHRASE, f"{_short(' '.join(phrase))} {count} times"))
                break  # one phrase issue is enough to say what is wrong
    return issues


def _malformed_numbers(text: str, limits: ValidationLimits) -> list[Issue]:
    found = [m.group(0) for m in _SECOND_POINT.finditer(text)]
    found += [m.group(0) for m in re.finditer(rf"\d{{{limits.max_digits + 1},}}", text)]
    return [Issue(Reason.MALFORMED_NUMBER, _short(", ".join(dict.fromkeys(found))))] if found else []


def _values(narrative: str, estimates: Mapping[str, float] | None) -> list[Issue]:
    issues = []
    for citation in find_citations(narrative):
        key = citation.biomarker_key
        if key is None:
            continue
        low, high = BY_KEY[key].plausible
        value = in_biomarker_unit(citation, key)
        if not low <= value <= high:
            issues.append(Issue(Reason.IMPLAUSIBLE_VALUE, f"{BY_KEY[key].name} {citation.text}"))
        elif estimates is not None and (estimates.get(key) is None or math.isnan(float(estimates[key]))):
            issues.append(Issue(Reason.UNMEASURED_VALUE, f"{BY_KEY[key].name} {citation.text}"))
    return issues


def _subtype(narrative: str, label: Label, estimates: Mapping[str, float] | None) -> list[Issue]:
    """The AMD subtype the words state against the one the estimates show (wet is urgent, dry routine)."""
    shown = amd_subtype(estimates) if estimates is not None and label is Label.AMD else None
    if shown is None:
        return []
    said = stated_subtypes(narrative)
    other = "dry" if shown == "wet" else "wet"
    if other not in said:
        return []
    evidence = ", ".join(sign.describe(estimates) for sign in WET_AMD_SIGNS)
    return [
        Issue(
            Reason.CONTRADICTS_ESTIMATES, f"{_short(said[other])} ({other}) but the estimates show {shown}: {evidence}"
        )
    ]


def _conclusion(impression: str, label: Label, label_found: bool) -> list[Issue]:
    """The label the concluding sentence names against the diagnosis line's (see the module docstring)."""
    named = label_from_text(impression)
    if not label_found or named in (Label.INDETERMINATE, label):
        return []
    return [Issue(Reason.CONTRADICTS_DIAGNOSIS, f"{_short(impression)} (diagnosis line: {label.value})")]


def _diagnosis(text: str, label_found: bool) -> list[Issue]:
    if label_found:
        return []
    has_line = re.search(r"diagnosis[ \t*_]*[:\-]", text, re.IGNORECASE) is not None
    return [Issue(Reason.INVALID_DIAGNOSIS if has_line else Reason.MISSING_DIAGNOSIS, "")]


def validate_narrative(
    text: str, estimates: Mapping[str, float] | None = None, *, limits: ValidationLimits = ValidationLimits()
) -> NarrativeCheck:
    """Check one generation (see the module docstring); `estimates` (key -> value) enables the
    unmeasured-value and the contradiction rules."""
    parsed = parse_generation(text)
    narrative = parsed.narrative
    words = _WORD.findall(narrative.lower())
    sentences = [" ".join(_WORD.findall(s.lower())) for s in _SENTENCE.split(narrative)]
    sentences = [s for s in sentences if s]
    seen: Counter[str] = Counter(sentences)
    repeated = sum(count - 1 for count in seen.values())
    issues: list[Issue] = []
    if repeated:
        sentence, count = seen.most_common(1)[0]
        issues.append(Issue(Reason.REPEATED_SENTENCE, f"{_short(sentence)} {count} times"))
    issues += _repeats(words, limits)
    issues += _malformed_numbers(parsed.raw_text, limits)
    issues += _diagnosis(parsed.raw_text, parsed.label_found)
    if len(words) < limits.min_words:
        issues.append(Issue(Reason.TOO_SHORT, f"{len(words)} words"))
    elif len(words) > limits.max_words:
        issues.append(Issue(Reason.TOO_LONG, f"{len(words)} words"))
    issues += _values(narrative, estimates)
    issues += _subtype(narrative, parsed.label, estimates)
    issues += _conclusion(parsed.impression, parsed.label, parsed.label_found)
    bigrams = list(zip(words, words[1:]))
    distinct = len(set(bigrams)) / len(bigrams) if bigrams else 1.0
    return NarrativeCheck(not issues, tuple(issues), len(words), repeated, distinct)
