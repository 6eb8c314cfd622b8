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
    #: the typical error of this estimate (the bundle's grok_pacs.analysis.estimate_error), None when unknown
    error: float | None = None


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


class Gradability(StrEnum):
    """Whether an eye (or one modality of it) can be read at all, decided before any diagnosis."""

    GRADABLE = "gradable"
    UNGRADABLE = "ungradable"  #: image quality insufficient: retake, or refer
    OUT_OF_SCOPE = "out-of-scope"  #: not an input this device is indicated for (wrong class, no laterality...)


#: Gate reason code (grok_pacs.analysis.quality) -> meaning; the SR codes them (grok_pacs.report.codes).
QUALITY_REASONS: dict[str, str] = {
    "sop-class-modality": "SOP class and Modality disagree",
    "laterality": "Laterality missing or not R/L",
    "photometric": "Photometric interpretation not supported for this modality",
    "bit-depth": "Bit depth not supported",
    "resolution": "Image below the minimum resolution",
    "frames": "Too few OCT frames",
    "undecodable": "Pixel data cannot be decoded",
    "field-coverage": "Insufficient retinal field coverage",
    "off-centre": "Retinal field off centre",
    "underexposed": "Image underexposed",
    "overexposed": "Image overexposed or saturated",
    "low-contrast": "Image contrast too low",
    "blur": "Image out of focus",
    "decoder-fill": "Image partly filled by the decoder (corrupted data)",
    "blank-frames": "Blank OCT frames",
    "saturated-frames": "Saturated OCT frames",
    "low-signal": "OCT signal strength too low",
    "motion": "Motion artefact",
    "learned-quality": "Learned quality model: image likely ungradable",
}


@dataclass(frozen=True)
class QualityReason:
    """Why an image is not gradable: a stable code (grok_pacs.analysis.quality.REASONS) and what was measured."""

    code: str  #: a QUALITY_REASONS key, e.g. "blur"
    detail: str  #: meaning, measured value against its threshold, e.g. "Image out of focus: sharpness 0.01 < 0.04"

    def __post_init__(self) -> None:
        if self.code not in QUALITY_REASONS:
            raise ValueError(f"quality reason {self.code!r} is not one of {sorted(QUALITY_REASONS)}")


@dataclass(frozen=True)
class ModalityQuality:
    """The gate's verdict on one modality's image of one eye."""

    modality: str  #: "CFP" or "OCT"
    gradability: Gradability
    reasons: tuple[QualityReason, ...] = ()  #: empty when gradable
    measures: dict[str, float] = field(default_factory=dict)  #: measure name -> value (documented in quality)
    sop_instance_uid: str | None = None  #: the instance judged


class Action(StrEnum):
    """What should happen next for an eye or a patient, most urgent first (see `ACTION_ORDER`)."""

    URGENT_REFERRAL = "urgent-referral"
    REFERRAL = "referral"
    RETAKE = "retake"  #: image quality insufficient: retake, or refer
    RESCREEN = "rescreen"


#: Severity, highest first: the patient-level roll-up takes the most severe eye.
ACTION_ORDER: tuple[Action, ...] = (Action.URGENT_REFERRAL, Action.REFERRAL, Action.RETAKE, Action.RESCREEN)


@dataclass(frozen=True)
class Disposition:
    """One row of the disposition table applied to an eye (or the roll-up over a patient's eyes)."""

    action: Action
    text: str  #: what to do, in words, e.g. "Refer to ophthalmology (referable diabetic retinopathy)"
    source: str  #: the guideline the row comes from (docs/domain.md, Dispositions), e.g. "NHS DESP R3/M1"
    rule: str  #: the table row's id, e.g. "dr-oedema"
    rescreen_months: int | None = None  #: for RESCREEN: the interval
    systemic: tuple[str, ...] = ()  #: patient level only: systemic labels reported once per patient
    eyes: tuple[str, ...] = ()  #: patient level only: the eye(s) whose disposition decided

    def __post_init__(self) -> None:
        if not isinstance(self.action, Action):
            raise ValueError(f"disposition {self.rule!r}: action {self.action!r} is not an Action")
        if (self.action is Action.RESCREEN) != (self.rescreen_months is not None):
            raise ValueError(f"disposition {self.rule!r}: a rescreen interval goes with (only) a rescreen action")
        if not self.text.strip() or not self.source.strip():
            raise ValueError(f"disposition {self.rule!r}: text and guideline source are required")


class NarrativeReason(StrEnum):
    """Why a generation failed validation (grok_pacs.analysis.validation); the code in metrics, SR, benchmark."""

    REPEATED_SENTENCE = "repeated_sentence"
    REPEATED_PHRASE = "repeated_phrase"
    MALFORMED_NUMBER = "malformed_number"
    MISSING_DIAGNOSIS = "missing_diagnosis"
    INVALID_DIAGNOSIS = "invalid_diagnosis"
    TOO_SHORT = "too_short"
    TOO_LONG = "too_long"
    IMPLAUSIBLE_VALUE = "implausible_value"
    UNMEASURED_VALUE = "unmeasured_value"
    CONTRADICTS_ESTIMATES = "contradicts_estimates"
    CONTRADICTS_DIAGNOSIS = "contradicts_diagnosis"


#: One human sentence per reason (the SR and logs show it; details add the offending text).
REASON_TEXT: dict[NarrativeReason, str] = {
    NarrativeReason.REPEATED_SENTENCE: "a sentence is repeated",
    NarrativeReason.REPEATED_PHRASE: "a phrase is repeated over and over",
    NarrativeReason.MALFORMED_NUMBER: "a number is malformed",
    NarrativeReason.MISSING_DIAGNOSIS: "the diagnosis line is missing",
    NarrativeReason.INVALID_DIAGNOSIS: "the diagnosis line names no single valid label",
    NarrativeReason.TOO_SHORT: "the findings text is too short",
    NarrativeReason.TOO_LONG: "the findings text is too long",
    NarrativeReason.IMPLAUSIBLE_VALUE: "a cited value is outside its biomarker's plausible range",
    NarrativeReason.UNMEASURED_VALUE: "a value is cited for a biomarker that was not measured",
    NarrativeReason.CONTRADICTS_ESTIMATES: "it names an AMD subtype (wet or dry) that the measurements contradict",
    NarrativeReason.CONTRADICTS_DIAGNOSIS: "its concluding sentence names another label than its diagnosis line",
}
assert set(REASON_TEXT) == set(NarrativeReason)


@dataclass(frozen=True)
class NarrativeIssue:
    reason: NarrativeReason
    detail: str  #: what was found, e.g. the repeated sentence (shortened)

    @property
    def text(self) -> str:
        """The reason's sentence and the detail: "a number is malformed: '0.375.0.0'"."""
        return f"{REASON_TEXT[self.reason]}: {self.detail}" if self.detail else REASON_TEXT[self.reason]


@dataclass(frozen=True)
class NarrativeCheck:
    """The validator's verdict on one generation, with a few text-health figures for the benchmark."""

    passed: bool
    issues: tuple[NarrativeIssue, ...]
    words: int  #: words of findings (the diagnosis line excluded)
    repeated_sentences: int  #: sentences that repeat an earlier one
    distinct_2: float  #: distinct word bigrams / all bigrams of the findings (1.0 when fewer than 2 words)

    def __post_init__(self) -> None:
        if self.passed != (not self.issues):
            raise ValueError(f"NarrativeCheck: passed={self.passed} contradicts {len(self.issues)} issue(s)")

    @property
    def reasons(self) -> tuple[NarrativeReason, ...]:
        """The distinct reasons, in the order first found."""
        return tuple(dict.fromkeys(issue.reason for issue in self.issues))

    def summary(self) -> str:
        """One line for an SR or a log: "passed" or the issues joined by "; "."""
        return "passed" if self.passed else "; ".join(issue.text for issue in self.issues)


DECIDER_CLASSIFIER = "decision classifier"  #: Report.decided_by: grok_pacs.model.decision decided the label
DECIDER_LM = "language model"  #: Report.decided_by: the language model's conclusion and scores decided it


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
    gradability: Gradability = (
        Gradability.GRADABLE
    )  #: the eye's gate outcome; not gradable -> no diagnosis, no narrative
    quality: tuple[ModalityQuality, ...] = ()  #: the gate's verdict per modality judged (ungradable ones were left out)
    disposition: Disposition | None = None  #: this eye's disposition (grok_pacs.report.dispositions)
    patient_disposition: Disposition | None = None  #: roll-up over the patient's eyes in this study
    probabilities_calibrated: bool = False  #: label_scores were temperature-calibrated (bundle calibration)
    #: the engine's label scores before the bundle's calibration (audit, calibration studies); {} when none
    uncalibrated_scores: dict[str, float] = field(default_factory=dict)
    operating_point: float | None = None  #: the Indeterminate threshold: a scored label below it is not used
    narrative_check: NarrativeCheck | None = None  #: validator on raw_text; failed: narrative "" (withheld)
    #: the label the validated narrative named but the report does not state: its calibrated probability is
    #: below the operating point (the report's label is then Indeterminate); None otherwise
    unsupported_label: Label | None = None
    #: which component decided the label: DECIDER_CLASSIFIER (the bundle's decision classifier; the language
    #: model wrote the findings) or DECIDER_LM (the language model's own conclusion and label scores)
    decided_by: str = "language model"
    #: the label the validated findings concluded (the language model's conclusion); None when withheld or absent
    lm_label: Label | None = None
    #: the language model's label scores (calibrated when the bundle is) when the classifier decided; else {}
    lm_scores: dict[str, float] = field(default_factory=dict)
    #: modality -> distance of its encoder features from the training features over the bundle's threshold
    #: (grok_pacs.analysis.ood): above 1 the image is unlike the training images and the eye is Indeterminate;
    #: {} for a bundle without an OOD model
    shift_scores: dict[str, float] = field(default_factory=dict)
    #: the validator's verdict on the first generation when the findings shipped are a second attempt
    #: (grok_pacs.analysis.rewrite), with that first text for audit; None and "" when the first was shipped
    first_attempt: NarrativeCheck | None = None
    first_attempt_text: str = ""

    @property
    def out_of_distribution(self) -> bool:
        """An image of this eye is unlike the training images (device shift): no diagnosis is stated."""
        return any(score > 1.0 for score in self.shift_scores.values())

    @property
    def narrative_withheld(self) -> bool:
        """The model's narrative failed validation and is not shipped as its findings."""
        return self.narrative_check is not None and not self.narrative_check.passed

    def __post_init__(self) -> None:
        if self.gradability is not Gradability.GRADABLE and (self.label is not Label.INDETERMINATE or self.narrative):
            raise ValueError(f"eye {self.eye}: a {self.gradability.value} eye gets no diagnosis and no narrative")

    @property
    def diagnosed(self) -> bool:
        """True when the report states a diagnosis (gradable eye, label other than Indeterminate)."""
        return self.gradability is Gradability.GRADABLE and self.label is not Label.INDETERMINATE

    @property
    def left_out(self) -> tuple[ModalityQuality, ...]:
        """Modalities judged and not used because they were not gradable."""
        return tuple(q for q in self.quality if q.gradability is not Gradability.GRADABLE)

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
