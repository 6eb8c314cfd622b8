"""The diagnostic label set of the Grounded Ophthalmic Understanding benchmark (docs/domain.md, Labels).

One enum, used by training (stage 1 records, benchmark), the runtime (report parsing) and the SR.
`INDETERMINATE` is what the runtime reports when the model's output names no valid label: it is never
a training label, and it is coded in the SR like the others.
"""

from __future__ import annotations

from enum import StrEnum


class Label(StrEnum):
    AMD = "AMD"
    GLAUCOMA = "Glaucoma"
    DIABETES = "Diabetes"
    HYPERTENSION = "Hypertension"
    ALZHEIMER = "Alzheimer"
    DIABETIC_RETINOPATHY = "DiabeticRetinopathy"
    NORMAL = "Normal"
    INDETERMINATE = "Indeterminate"


#: The seven labels a study can carry in training and evaluation, in the benchmark's fixed order.
DIAGNOSTIC_LABELS: tuple[Label, ...] = (
    Label.AMD,
    Label.GLAUCOMA,
    Label.DIABETES,
    Label.HYPERTENSION,
    Label.ALZHEIMER,
    Label.DIABETIC_RETINOPATHY,
    Label.NORMAL,
)

#: Words a clinician (or a model) uses for each label, lower case; used to read a label out of free text.
LABEL_SYNONYMS: dict[Label, tuple[str, ...]] = {
    Label.AMD: ("amd", "age-related macular degeneration", "macular degeneration"),
    Label.GLAUCOMA: ("glaucoma", "glaucomatous optic neuropathy"),
    Label.DIABETES: ("diabetes", "diabetes mellitus"),
    Label.HYPERTENSION: ("hypertension", "hypertensive retinopathy", "systemic hypertension"),
    Label.ALZHEIMER: ("alzheimer", "alzheimer's disease", "alzheimers"),
    Label.DIABETIC_RETINOPATHY: ("diabeticretinopathy", "diabetic retinopathy"),
    Label.NORMAL: ("normal", "no abnormality", "healthy"),
}


def parse_label(text: str) -> Label:
    """Return the label whose canonical name or synonym equals `text` (case-insensitive).

    Raises ValueError naming the valid labels otherwise; callers that must not fail (report parsing)
    catch it and use `Label.INDETERMINATE`.
    """
    key = text.strip().strip(".:;,").lower()
    for label in Label:
        if key == label.value.lower():
            return label
    for label, words in LABEL_SYNONYMS.items():
        if key in words:
            return label
    valid = ", ".join(label.value for label in DIAGNOSTIC_LABELS)
    raise ValueError(f"unknown label {text!r}; valid labels: {valid}")
