"""The 37 retinal biomarkers (31 OCT + 6 CFP) of docs/domain.md, Biomarkers: the one source of truth.

Training (phantom generator, stage-2 targets, stage-1 prompt JSON), the runtime heads, the prompt and the
SR all read names, units and ranges from here, in this order. `normal` is the approximate healthy adult
range (for the phantom generator and for "within / outside normal limits" wording); `plausible` is the
range outside which a value is treated as a data error by the manifest loader.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class Modality(StrEnum):
    OCT = "OCT"
    CFP = "CFP"


@dataclass(frozen=True)
class Biomarker:
    key: str  #: short snake_case key used in manifests, tensors and code
    name: str  #: the exact name of the paper (no unit)
    modality: Modality
    unit: str  #: UCUM unit code: "um" (micrometre) or "1" (unitless)
    normal: tuple[float, float]  #: approximate healthy adult range
    plausible: tuple[float, float]  #: values outside are rejected as data errors

    @property
    def prompt_name(self) -> str:
        """The name as the paper's prompt JSON spells it: OCT names carry ` (um)`."""
        return f"{self.name} (um)" if self.unit == "um" else self.name

    @property
    def unit_meaning(self) -> str:
        return "micrometer" if self.unit == "um" else "no units"


def _oct(key: str, name: str, normal: tuple[float, float], plausible: tuple[float, float]) -> Biomarker:
    return Biomarker(key, name, Modality.OCT, "um", normal, plausible)


def _cfp(key: str, name: str, normal: tuple[float, float], plausible: tuple[float, float]) -> Biomarker:
    return Biomarker(key, name, Modality.CFP, "1", normal, plausible)


_SUBFIELD_THICKNESS = [
    _oct(f"mt_{ring}_{side}", f"Macular thickness at the {ring} {side} subfield", normal, (100.0, 800.0))
    for ring, normal in (("inner", (300.0, 350.0)), ("outer", (260.0, 310.0)))
    for side in ("inferior", "nasal", "superior", "temporal")
]


def _layer(
    prefix: str,
    label: str,
    central: tuple[float, float],
    inner: tuple[float, float],
    outer: tuple[float, float],
    plausible: tuple[float, float],
) -> list[Biomarker]:
    avg = ((central[0] + inner[0] + outer[0]) / 3, (central[1] + inner[1] + outer[1]) / 3)
    return [
        _oct(f"{prefix}_central", f"{label} thickness: central subfield", central, plausible),
        _oct(f"{prefix}_inner", f"{label} thickness: inner subfield", inner, plausible),
        _oct(f"{prefix}_outer", f"{label} thickness: outer subfield", outer, plausible),
        _oct(f"{prefix}_average", f"{label} thickness: average", avg, plausible),
    ]


OCT_BIOMARKERS: tuple[Biomarker, ...] = (
    *_SUBFIELD_THICKNESS,
    _oct("rpe_average", "Overall average retinal pigment epithelium (RPE) thickness", (15.0, 25.0), (2.0, 200.0)),
    _oct("disc_diameter_vertical", "Mean of vertical disc diameter", (1500.0, 2000.0), (500.0, 4000.0)),
    _oct("inl_average", "Average inner nuclear layer (INL) thickness", (30.0, 40.0), (5.0, 150.0)),
    _oct("gcipl_average", "Average ganglion cell-inner plexiform layer (GCIPL) thickness", (65.0, 85.0), (10.0, 200.0)),
    *_layer("inl_elm", "INL-ELM", (90.0, 110.0), (80.0, 95.0), (65.0, 80.0), (10.0, 400.0)),
    *_layer("elm_isos", "ELM-ISOS", (22.0, 28.0), (19.0, 24.0), (17.0, 22.0), (2.0, 100.0)),
    *_layer("isos_rpe", "ISOS-RPE", (38.0, 46.0), (34.0, 42.0), (31.0, 38.0), (2.0, 400.0)),
    *_layer("inl_rpe", "INL-RPE", (160.0, 180.0), (140.0, 160.0), (120.0, 140.0), (20.0, 800.0)),
    _oct("mt_overall", "Overall macular thickness", (260.0, 300.0), (100.0, 800.0)),
    _oct("mt_central", "Macular thickness at the central subfield", (230.0, 280.0), (80.0, 1000.0)),
    _oct("rnfl_average", "Average retinal nerve fibre layer (RNFL) thickness", (25.0, 35.0), (2.0, 150.0)),
)

CFP_BIOMARKERS: tuple[Biomarker, ...] = (
    _cfp("cup_to_disc", "cup-to-disc ratio", (0.2, 0.5), (0.0, 1.0)),
    _cfp("avr", "arteriolar-to-venular ratio (AVR)", (0.65, 0.9), (0.2, 1.6)),
    _cfp("tortuosity_arterial", "arterial tortuosity", (1.05, 1.15), (1.0, 3.0)),
    _cfp("tortuosity_venular", "venular tortuosity", (1.05, 1.15), (1.0, 3.0)),
    _cfp("fd_arterial", "arterial fractal dimension", (1.35, 1.5), (1.0, 2.0)),
    _cfp("fd_venular", "venular fractal dimension", (1.35, 1.5), (1.0, 2.0)),
)

BIOMARKERS: tuple[Biomarker, ...] = OCT_BIOMARKERS + CFP_BIOMARKERS
BY_KEY: dict[str, Biomarker] = {b.key: b for b in BIOMARKERS}
OCT_KEYS: tuple[str, ...] = tuple(b.key for b in OCT_BIOMARKERS)
CFP_KEYS: tuple[str, ...] = tuple(b.key for b in CFP_BIOMARKERS)

assert len(OCT_BIOMARKERS) == 31 and len(CFP_BIOMARKERS) == 6 and len(BY_KEY) == 37

#: Short prose names (how reports name each biomarker; grok_pacs.analysis.grounding ties them to their key).
#: The guideline teacher writes them and the compact prompt block lists the estimates under them.
PROSE_NAMES: dict[str, str] = {
    "cup_to_disc": "cup-to-disc ratio",
    "avr": "arteriolar-to-venular ratio",
    "tortuosity_arterial": "arterial tortuosity",
    "tortuosity_venular": "venular tortuosity",
    "fd_arterial": "arterial fractal dimension",
    "fd_venular": "venular fractal dimension",
    "disc_diameter_vertical": "vertical disc diameter",
    "rnfl_average": "RNFL thickness",
    "gcipl_average": "GCIPL thickness",
    "inl_average": "INL thickness",
    "rpe_average": "RPE thickness",
    "mt_central": "central subfield thickness",
    "mt_overall": "overall macular thickness",
    **{
        f"mt_{r}_{s}": f"{r} {s} macular thickness"
        for r in ("inner", "outer")
        for s in ("inferior", "nasal", "superior", "temporal")
    },
    **{
        f"{p}_{r}": f"{r} {n} thickness"
        for p, n in (
            ("inl_elm", "INL-ELM"),
            ("elm_isos", "ELM-IS/OS"),
            ("isos_rpe", "IS/OS-RPE"),
            ("inl_rpe", "INL-RPE"),
        )
        for r in ("central", "inner", "outer", "average")
    },
}
assert set(PROSE_NAMES) == set(BY_KEY)


def format_value(biomarker: Biomarker, value: float) -> str:
    """The value as text: micrometres to one decimal, unitless ratios to three."""
    return f"{value:.1f}" if biomarker.unit == "um" else f"{value:.3f}"


def to_prompt_json(values: Mapping[str, float]) -> str:
    """Biomarkers as the paper's prompt JSON (values as strings; missing or NaN values left out)."""

    def group(markers: tuple[Biomarker, ...]) -> dict[str, str]:
        return {
            b.prompt_name: format_value(b, float(values[b.key]))
            for b in markers
            if b.key in values and values[b.key] is not None and not math.isnan(float(values[b.key]))
        }

    return json.dumps({"OCT_Measures": group(OCT_BIOMARKERS), "CFP_Measures": group(CFP_BIOMARKERS)})
