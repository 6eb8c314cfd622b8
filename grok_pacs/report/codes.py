"""Every coded concept grok-pacs writes, in one place (docs/domain.md, Labels and DICOM objects).

Plain (value, scheme, meaning) triples, so importing this module costs nothing; `sr.py` turns them into
highdicom `CodedConcept`s. SNOMED CT uses the scheme designator `SCT` (never the retired `SRT`).
"""

from __future__ import annotations

from typing import NamedTuple

from grok_pacs.domain.labels import Label


class Code(NamedTuple):
    value: str
    scheme: str
    meaning: str


SCT = "SCT"
DCM = "DCM"
UCUM = "UCUM"

#: The diagnosis of each label, as the SR's coded qualitative evaluation.
LABEL_CODES: dict[Label, Code] = {
    Label.AMD: Code("267718000", SCT, "Age-related macular degeneration"),
    Label.GLAUCOMA: Code("23986001", SCT, "Glaucoma"),
    Label.DIABETES: Code("73211009", SCT, "Diabetes mellitus"),
    Label.HYPERTENSION: Code("38341003", SCT, "Hypertensive disorder, systemic arterial"),
    Label.ALZHEIMER: Code("26929004", SCT, "Alzheimer's disease"),
    Label.DIABETIC_RETINOPATHY: Code("4855003", SCT, "Diabetic retinopathy"),
    Label.NORMAL: Code("17621005", SCT, "Normal"),
    Label.INDETERMINATE: Code("82334004", SCT, "Indeterminate"),
}

# Equipment and anatomy.
FUNDUS_CAMERA = Code("409898007", SCT, "Fundus camera")
OCT_SCANNER = Code("392012008", SCT, "Optical coherence tomography scanner")
RETINA = Code("5665001", SCT, "Retina")
EYE = Code("81745001", SCT, "Eye")
RIGHT = Code("24028007", SCT, "Right")
LEFT = Code("7771000", SCT, "Left")
BOTH_EYES = Code("40638003", SCT, "Both eyes")

#: DICOM laterality value (ImageLaterality / Laterality) -> SNOMED CT laterality qualifier.
LATERALITY_CODES: dict[str, Code] = {"R": RIGHT, "L": LEFT, "B": BOTH_EYES}

# --- SR document structure (sr.py) -------------------------------------------------------------------
#: Private coding scheme of grok-pacs' own concepts (DICOM PS3.16 8.2: private designators start "99").
GROK = "99GROK"
GROK_SCHEME_NAME = "grok-pacs retinal biomarkers"

DIAGNOSIS = Code("439401001", SCT, "Diagnosis")
IMAGING_PROCEDURE = Code("363679005", SCT, "Imaging procedure")
FINDINGS = Code("121070", DCM, "Findings")
FINDING = Code("121071", DCM, "Finding")
IMPRESSION = Code("121073", DCM, "Impression")
COMMENT = Code("121106", DCM, "Comment")
PROCESSING_EQUIPMENT = Code("109102", DCM, "Processing Equipment")

#: The first NUM of an eye's first measurement group states the diagnosis with its score: OHIF's SR viewport
#: draws a group's NUMs ("name: value unit") and never its coded diagnosis, so this is how the diagnosis is seen
#: there. One code value per label and kind (calibrated probability / uncalibrated model score); values never
#: change once written. Indeterminate's value is the highest label's score, which reached no operating point.
_SCORE_VALUES: dict[Label, str] = {
    Label.AMD: "01",
    Label.GLAUCOMA: "02",
    Label.DIABETES: "03",
    Label.HYPERTENSION: "04",
    Label.ALZHEIMER: "05",
    Label.DIABETIC_RETINOPATHY: "06",
    Label.NORMAL: "07",
    Label.INDETERMINATE: "08",
}
PERCENT = Code("%", UCUM, "percent")


def diagnosis_score_code(label: Label, calibrated: bool) -> Code:
    """'Probability of Glaucoma (AI)' (calibrated) or 'Model score of Glaucoma (AI)' (not calibrated)."""
    kind = "probability" if calibrated else "model score"
    meaning = (
        f"Indeterminate (AI): highest label {kind}"
        if label is Label.INDETERMINATE
        else f"{kind.capitalize()} of {LABEL_CODES[label].meaning} (AI)"
    )
    return Code(f"GROK-DX-{'P' if calibrated else 'S'}{_SCORE_VALUES[label]}", GROK, meaning)


# --- the PDF report (encapsulated.py) ------------------------------------------------------------------
LN = "LN"
#: Concept name of the Encapsulated PDF (LOINC document type, as IHE displayable reports use).
AI_REPORT_DOCUMENT = Code("18748-4", LN, "Diagnostic imaging study")

#: UCUM unit code (as `grok_pacs.domain.biomarkers` spells it) -> coded unit.
UNIT_CODES: dict[str, Code] = {
    "um": Code("um", UCUM, "micrometer"),
    "1": Code("1", UCUM, "no units"),
}

#: Biomarker key -> code value in the GROK scheme. Code values never change once written to an SR;
#: the meaning is the biomarker's name in grok_pacs.domain.biomarkers (docs/domain.md, Biomarkers). New biomarkers
#: get new values.
BIOMARKER_CODE_VALUES: dict[str, str] = {
    "mt_inner_inferior": "GROK-BM-001",
    "mt_inner_nasal": "GROK-BM-002",
    "mt_inner_superior": "GROK-BM-003",
    "mt_inner_temporal": "GROK-BM-004",
    "mt_outer_inferior": "GROK-BM-005",
    "mt_outer_nasal": "GROK-BM-006",
    "mt_outer_superior": "GROK-BM-007",
    "mt_outer_temporal": "GROK-BM-008",
    "rpe_average": "GROK-BM-009",
    "disc_diameter_vertical": "GROK-BM-010",
    "inl_average": "GROK-BM-011",
    "gcipl_average": "GROK-BM-012",
    "inl_elm_central": "GROK-BM-013",
    "inl_elm_inner": "GROK-BM-014",
    "inl_elm_outer": "GROK-BM-015",
    "inl_elm_average": "GROK-BM-016",
    "elm_isos_central": "GROK-BM-017",
    "elm_isos_inner": "GROK-BM-018",
    "elm_isos_outer": "GROK-BM-019",
    "elm_isos_average": "GROK-BM-020",
    "isos_rpe_central": "GROK-BM-021",
    "isos_rpe_inner": "GROK-BM-022",
    "isos_rpe_outer": "GROK-BM-023",
    "isos_rpe_average": "GROK-BM-024",
    "inl_rpe_central": "GROK-BM-025",
    "inl_rpe_inner": "GROK-BM-026",
    "inl_rpe_outer": "GROK-BM-027",
    "inl_rpe_average": "GROK-BM-028",
    "mt_overall": "GROK-BM-029",
    "mt_central": "GROK-BM-030",
    "rnfl_average": "GROK-BM-031",
    "cup_to_disc": "GROK-BM-032",
    "avr": "GROK-BM-033",
    "tortuosity_arterial": "GROK-BM-034",
    "tortuosity_venular": "GROK-BM-035",
    "fd_arterial": "GROK-BM-036",
    "fd_venular": "GROK-BM-037",
}


def biomarker_code(key: str) -> Code:
    """The coded concept name of a biomarker measurement; KeyError names unknown keys."""
    from grok_pacs.domain.biomarkers import BY_KEY  # local: keeps this module import-free at load time

    if key not in BIOMARKER_CODE_VALUES or key not in BY_KEY:
        raise KeyError(f"biomarker {key!r} has no code in grok_pacs.report.codes.BIOMARKER_CODE_VALUES")
    return Code(BIOMARKER_CODE_VALUES[key], GROK, BY_KEY[key].name)


# --- safety gate and dispositions (grok_pacs.analysis.quality, grok_pacs.report.dispositions) ---------
# No SNOMED CT or DICOM code for image gradability, its reasons or a screening disposition could be verified
# offline, so these use the private 99GROK scheme (values never change once written); the concept name of a
# disposition is DICOM's "Recommendation".
RECOMMENDATION = Code("121075", DCM, "Recommendation")
PATIENT_RECOMMENDATION = Code("GROK-DISP-000", GROK, "Patient-level recommendation (worse eye decides)")
GRADABILITY = Code("GROK-Q-000", GROK, "Image gradability")
QUALITY_REASON = Code("GROK-Q-100", GROK, "Image quality finding")

#: Gradability value -> coded outcome (grok_pacs.analysis.result.Gradability values).
GRADABILITY_CODES: dict[str, Code] = {
    "gradable": Code("GROK-Q-001", GROK, "Gradable"),
    "ungradable": Code("GROK-Q-002", GROK, "Ungradable: image quality insufficient"),
    "out-of-scope": Code("GROK-Q-003", GROK, "Out of scope: not an indicated input"),
}

#: Quality reason (grok_pacs.analysis.quality.REASONS keys) -> code value in the GROK scheme.
QUALITY_REASON_VALUES: dict[str, str] = {
    "sop-class-modality": "GROK-Q-101",
    "laterality": "GROK-Q-102",
    "photometric": "GROK-Q-103",
    "bit-depth": "GROK-Q-104",
    "resolution": "GROK-Q-105",
    "frames": "GROK-Q-106",
    "undecodable": "GROK-Q-107",
    "field-coverage": "GROK-Q-108",
    "off-centre": "GROK-Q-109",
    "underexposed": "GROK-Q-110",
    "overexposed": "GROK-Q-111",
    "low-contrast": "GROK-Q-112",
    "blur": "GROK-Q-113",
    "decoder-fill": "GROK-Q-114",
    "blank-frames": "GROK-Q-115",
    "saturated-frames": "GROK-Q-116",
    "low-signal": "GROK-Q-117",
    "learned-quality": "GROK-Q-118",
    "motion": "GROK-Q-119",
}

#: Disposition action (grok_pacs.analysis.result.Action values) -> coded action.
ACTION_CODES: dict[str, Code] = {
    "urgent-referral": Code("GROK-DISP-001", GROK, "Urgent referral to ophthalmology"),
    "referral": Code("GROK-DISP-002", GROK, "Referral"),
    "retake": Code("GROK-DISP-003", GROK, "Image quality insufficient: retake, or refer"),
    "rescreen": Code("GROK-DISP-004", GROK, "Rescreen"),
}


def quality_reason_code(reason: str) -> Code:
    """The coded concept of a gate reason; KeyError names unknown reasons."""
    from grok_pacs.analysis.result import QUALITY_REASONS  # local: keeps this module import-free at load time

    if reason not in QUALITY_REASON_VALUES or reason not in QUALITY_REASONS:
        raise KeyError(f"quality reason {reason!r} has no code in grok_pacs.report.codes.QUALITY_REASON_VALUES")
    return Code(QUALITY_REASON_VALUES[reason], GROK, QUALITY_REASONS[reason])
