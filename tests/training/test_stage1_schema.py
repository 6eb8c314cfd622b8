"""The biomarker schema (grok_pacs.domain.biomarkers) against docs/domain.md, Biomarkers: exact names, order, UCUM
units, ranges."""

from __future__ import annotations

import json
import math
import re

from grok_pacs.domain.biomarkers import BIOMARKERS, BY_KEY, CFP_KEYS, OCT_KEYS, Modality, format_value, to_prompt_json

_LAYER = ("central subfield", "inner subfield", "outer subfield", "average")
PAPER_OCT_NAMES = [
    *(
        f"Macular thickness at the {ring} {side} subfield"
        for ring in ("inner", "outer")
        for side in ("inferior", "nasal", "superior", "temporal")
    ),
    "Overall average retinal pigment epithelium (RPE) thickness",
    "Mean of vertical disc diameter",
    "Average inner nuclear layer (INL) thickness",
    "Average ganglion cell-inner plexiform layer (GCIPL) thickness",
    *(f"{layer} thickness: {part}" for layer in ("INL-ELM", "ELM-ISOS", "ISOS-RPE", "INL-RPE") for part in _LAYER),
    "Overall macular thickness",
    "Macular thickness at the central subfield",
    "Average retinal nerve fibre layer (RNFL) thickness",
]
PAPER_CFP_NAMES = [
    "cup-to-disc ratio",
    "arteriolar-to-venular ratio (AVR)",
    "arterial tortuosity",
    "venular tortuosity",
    "arterial fractal dimension",
    "venular fractal dimension",
]
#: UCUM case-sensitive codes of the units docs/domain.md, Biomarkers, uses: micrometre and the unity (dimensionless)
#: "1".
UCUM_CODES = {"um": "micrometre", "1": "unity"}


def test_names_and_order_are_exactly_spec_section_2() -> None:
    assert len(PAPER_OCT_NAMES) == 31
    assert [b.name for b in BIOMARKERS if b.modality == Modality.OCT] == PAPER_OCT_NAMES
    assert [b.name for b in BIOMARKERS if b.modality == Modality.CFP] == PAPER_CFP_NAMES
    assert len(OCT_KEYS) == 31 and len(CFP_KEYS) == 6 and len(BY_KEY) == 37
    assert list(OCT_KEYS) + list(CFP_KEYS) == [b.key for b in BIOMARKERS]


def test_units_are_valid_ucum_codes() -> None:
    for b in BIOMARKERS:
        assert b.unit in UCUM_CODES, b.key
        assert b.unit == ("um" if b.modality == Modality.OCT else "1"), b.key
        assert re.fullmatch(r"[a-z][a-z0-9_]*", b.key), b.key


def test_ranges_are_ordered_and_normal_lies_inside_plausible() -> None:
    for b in BIOMARKERS:
        (lo, hi), (plo, phi) = b.normal, b.plausible
        assert plo <= lo < hi <= phi, b.key


def test_prompt_json_is_the_papers_format() -> None:
    values = {b.key: sum(b.normal) / 2 for b in BIOMARKERS}
    values["avr"] = math.nan
    data = json.loads(to_prompt_json(values))
    assert set(data) == {"OCT_Measures", "CFP_Measures"}
    assert len(data["OCT_Measures"]) == 31 and len(data["CFP_Measures"]) == 5  # NaN left out
    assert data["OCT_Measures"]["Macular thickness at the inner inferior subfield (um)"] == "325.0"
    assert data["CFP_Measures"]["cup-to-disc ratio"] == format_value(BY_KEY["cup_to_disc"], 0.35) == "0.350"
    assert all(isinstance(v, str) for group in data.values() for v in group.values())
