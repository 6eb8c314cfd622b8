"""Reading a generation: label, narrative, impression and cited numbers, whatever the model wrote.

Never raises on any string and never returns a label outside `Label` (a missing, truncated, unknown or
ambiguous diagnosis line gives `Label.INDETERMINATE`); the raw text is kept unmodified for audit.
The expected shape (grok_pacs.model.prompt.format_target): one findings paragraph, then `Diagnosis: <Label>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from grok_pacs.analysis.grounding import extract_cited_numbers
from grok_pacs.analysis.result import CitedNumber
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, LABEL_SYNONYMS, Label, parse_label
from grok_pacs.model.prompt import IM_END, IM_START

#: "Diagnosis:" (or "Diagnosis -"), at a line start or after a sentence, with optional markdown emphasis;
#: its value runs to the end of that line. The last one in the text counts.
_DIAGNOSIS_MARK = re.compile(
    r"(?:^|(?<=[\s.;*_>#]))(?:final\s+)?diagnosis[ \t*_]*[:\-][ \t*_]*", re.IGNORECASE | re.MULTILINE
)
_SPECIAL = re.compile("|".join(re.escape(t) for t in (IM_START, IM_END, "<|endoftext|>", "<image>")))
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")


@dataclass(frozen=True)
class ParsedGeneration:
    label: Label  #: a diagnostic label, or INDETERMINATE when the text names none unambiguously
    label_found: bool  #: a diagnosis line with a valid label was present
    narrative: str  #: the findings text without the diagnosis line (whitespace normalised)
    impression: str  #: the conclusion: the narrative's last sentence (or the diagnosis when none)
    cited_numbers: tuple[CitedNumber, ...]
    raw_text: str  #: exactly what was parsed


def _label_words() -> list[tuple[str, Label]]:
    words = [(label.value.lower(), label) for label in DIAGNOSTIC_LABELS]
    words += [(word, label) for label, synonyms in LABEL_SYNONYMS.items() for word in synonyms]
    return sorted(words, key=lambda item: -len(item[0]))  # longest first: "diabetic retinopathy" before "diabetes"


def label_from_text(value: str) -> Label:
    """The one label a diagnosis value names; INDETERMINATE when none or several different ones."""
    cleaned = value.strip().strip("*_.:;, \t\"'`")
    try:
        label = parse_label(cleaned)
        return label if label in DIAGNOSTIC_LABELS else Label.INDETERMINATE
    except ValueError:
        pass  # not a bare label: look for label words inside the value below
    lowered, found = cleaned.lower(), set()
    for word, label in _label_words():
        pattern = rf"(?<![a-z]){re.escape(word)}(?![a-z])"
        if re.search(pattern, lowered):
            found.add(label)
            lowered = re.sub(pattern, " ", lowered)  # "diabetic retinopathy" must not also count as diabetes
    return found.pop() if len(found) == 1 else Label.INDETERMINATE


def _last_sentence(text: str) -> str:
    sentences = [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]
    return sentences[-1] if sentences else ""


def parse_generation(text: str) -> ParsedGeneration:
    """Parse one generation (see module docstring); `text` is kept as `raw_text`."""
    raw = text if isinstance(text, str) else str(text)
    clean = _SPECIAL.sub(" ", raw)
    matches = list(_DIAGNOSIS_MARK.finditer(clean))
    label, found = Label.INDETERMINATE, False
    body = clean
    if matches:
        last = matches[-1]
        label = label_from_text(clean[last.end() :].split("\n", 1)[0])
        found = label != Label.INDETERMINATE
        body = clean[: last.start()]  # the findings come before the final diagnosis
    narrative = " ".join(body.split()).rstrip("*_#> ")
    impression = _last_sentence(narrative) or (f"Diagnosis: {label.value}" if found else "")
    return ParsedGeneration(label, found, narrative, impression, tuple(extract_cited_numbers(narrative)), raw)
