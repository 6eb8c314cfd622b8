"""The typed result of analysing one eye: what the SR writer and the benchmark consume.

The model's generation is free text; `Report` is what survives parsing: a label that is always one of the
7 diagnostic labels or `Label.INDETERMINATE`, never anything else, with the raw text kept for audit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum

from grok_pacs.domain.labels import Label


class Eye(StrEnum):
    RIGHT = "R"
    LEFT = "L"


@dataclass(frozen=True)
class BiomarkerEstimate:
    key: str  #: grok_pacs.domain.biomarkers key
    value: float  #: in the biomarker's unit
    unit: str  #: UCUM code ("um" or "1")


@dataclass(frozen=True)
class CitedNumber:
    """A number the narrative states, with the biomarker it was matched to (None when unmatched)."""

    text: str  #: the number as written, e.g. "0.72"
    value: float
    biomarker_key: str | None


@dataclass(frozen=True)
class SourceImage:
    """A DICOM instance the report was computed from (for SR evidence references)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    frame: int | None = None  #: 1-based frame number used (the foveal B-scan for OCT)


@dataclass(frozen=True)
class Report:
    eye: Eye
    label: Label  #: one of DIAGNOSTIC_LABELS or Label.INDETERMINATE
    narrative: str  #: the findings paragraph, without the final diagnosis line
    impression: str  #: one sentence: the conclusion
    raw_text: str  #: the model's generation, unmodified
    biomarkers: tuple[BiomarkerEstimate, ...]  #: head estimates (OCT ones absent without OCT, etc.)
    cited_numbers: tuple[CitedNumber, ...]
    label_scores: dict[str, float]  #: label -> probability, when the engine computes them; else {}
    missing_modalities: tuple[str, ...]  #: subset of ("CFP", "OCT")
    sources: tuple[SourceImage, ...]
    oct_frame_index: int | None  #: 0-based index of the B-scan used, None without OCT
    oct_frame_method: str | None  #: "fovea" (pit found) or "central" (fallback)
    bundle_name: str
    bundle_version: str
    timings_s: dict[str, float] = field(default_factory=dict)  #: stage name -> seconds
    numbers_rewritten: int = 0  #: cited numbers the runtime wrote as the SR's estimates (raw_text has the model's)

    @property
    def text(self) -> str:
        """Findings and impression as one text (the impression once, when it is the narrative's last sentence)."""
        return findings_text(self.narrative, self.impression)

    def to_dict(self) -> dict:
        return asdict(self)


def findings_text(narrative: str, impression: str) -> str:
    """`narrative` then `impression`, leaving the impression out when the narrative already contains it."""
    narrative, impression = narrative.strip(), impression.strip()
    return narrative if impression and impression in narrative else " ".join(p for p in (narrative, impression) if p)
