"""Every coded concept grok-pacs writes, in one place (SPEC §1, §5).

Plain (value, scheme, meaning) triples, so importing this module costs nothing; `sr.py` turns them into
highdicom `CodedConcept`s. SNOMED CT uses the scheme designator `SCT` (never the retired `SRT`).
"""

from __future__ import annotations

from typing import NamedTuple

from grok_pacs.labels import Label


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
