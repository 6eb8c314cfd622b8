"""Label-conditioned sampling of a phantom subject: anatomy, vessel parameters, lesions, acquisition.

Directions follow docs/domain.md, Biomarkers, and are exaggerated on purpose so that each label is learnable from the
images: glaucoma thins RNFL/GCIPL and enlarges the cup; AMD thickens OS/RPE with drusen (and subretinal fluid when
wet); DR thickens the inner/outer nuclear layers with cysts and adds haemorrhages and exudates;
hypertension narrows and twists the arterioles (low AVR, high arterial tortuosity); diabetes without
retinopathy dilates and twists the venules and thins the INL; Alzheimer thins the superior RNFL and the
outer macula and has sparse (low fractal dimension), straight vessels. Everything else is subject noise.
All values are synthetic; nothing here is clinical data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from grok_pacs.domain.biomarkers import BY_KEY, CFP_KEYS
from grok_pacs.domain.labels import Label
from training.phantom.anatomy import PROFILE_LAYERS, Blob, RetinaModel, layer_stack, oct_biomarkers, total_thickness

N_FRAMES = 25  #: B-scans per OCT volume, superior (frame 0) to inferior
SCAN_MM = 6.0  #: the macular cube is SCAN_MM x SCAN_MM
MAX_TOTAL_UM = 430.0  #: lesions are scaled so that ILM-BM never exceeds this (the B-scan's depth budget)

#: Per-label layer scale factors (central, inner, outer); absent layers are 1.
_OCT_SCALE: dict[Label, dict[str, tuple[float, float, float]]] = {
    Label.NORMAL: {},
    Label.GLAUCOMA: {"rnfl": (0.75, 0.60, 0.58), "gcipl": (0.82, 0.70, 0.74)},
    Label.AMD: {"os": (1.28, 1.18, 1.06), "rpe": (1.35, 1.25, 1.10), "is": (0.90, 0.94, 0.98)},
    Label.DIABETIC_RETINOPATHY: {"inl": (1.30, 1.18, 1.05), "onl": (1.22, 1.12, 1.03)},
    Label.HYPERTENSION: {"rnfl": (1.0, 0.97, 0.96)},
    Label.DIABETES: {"inl": (0.86, 0.85, 0.86), "gcipl": (0.93, 0.91, 0.93), "rnfl": (0.96, 0.95, 0.95)},
    Label.ALZHEIMER: {"rnfl": (0.92, 0.86, 0.80), "gcipl": (0.90, 0.86, 0.88), "onl": (0.98, 0.95, 0.90)},
}
#: Extra per-quadrant loss (nasal, superior, temporal, inferior): glaucoma inferior, Alzheimer superior.
_OCT_QUADRANT: dict[Label, dict[str, tuple[float, float, float, float]]] = {
    Label.GLAUCOMA: {"rnfl": (1.0, 0.95, 1.0, 0.78), "gcipl": (1.0, 0.97, 1.0, 0.88)},
    Label.ALZHEIMER: {"rnfl": (1.0, 0.80, 1.0, 0.97), "gcipl": (1.0, 0.93, 1.0, 1.0)},
}
#: Per-label CFP biomarkers (mean, sd): cup-to-disc, AVR, tortuosities, fractal dimensions; disc in um.
_CFP: dict[Label, dict[str, tuple[float, float]]] = {
    Label.NORMAL: {
        "cup_to_disc": (0.33, 0.06),
        "avr": (0.78, 0.035),
        "tortuosity_arterial": (1.09, 0.012),
        "tortuosity_venular": (1.10, 0.012),
        "fd_arterial": (1.45, 0.015),
        "fd_venular": (1.46, 0.015),
    },
    Label.GLAUCOMA: {
        "cup_to_disc": (0.75, 0.05),
        "avr": (0.76, 0.035),
        "fd_arterial": (1.42, 0.015),
        "fd_venular": (1.43, 0.015),
    },
    Label.AMD: {"avr": (0.75, 0.035), "fd_arterial": (1.42, 0.015), "fd_venular": (1.43, 0.015)},
    Label.DIABETIC_RETINOPATHY: {
        "avr": (0.68, 0.035),
        "tortuosity_venular": (1.17, 0.015),
        "fd_arterial": (1.40, 0.015),
        "fd_venular": (1.40, 0.015),
    },
    Label.HYPERTENSION: {
        "avr": (0.55, 0.03),
        "tortuosity_arterial": (1.24, 0.02),
        "tortuosity_venular": (1.13, 0.015),
        "fd_arterial": (1.41, 0.015),
    },
    Label.DIABETES: {"avr": (0.66, 0.03), "tortuosity_venular": (1.19, 0.015), "fd_venular": (1.37, 0.015)},
    Label.ALZHEIMER: {
        "avr": (0.80, 0.035),
        "tortuosity_arterial": (1.04, 0.008),
        "tortuosity_venular": (1.05, 0.008),
        "fd_arterial": (1.32, 0.015),
        "fd_venular": (1.33, 0.015),
    },
}
_DISC_UM = {Label.GLAUCOMA: (1850.0, 130.0)}
_AGE = {Label.AMD: (73, 6), Label.ALZHEIMER: (75, 6), Label.GLAUCOMA: (66, 8), Label.NORMAL: (55, 10)}


@dataclass(frozen=True)
class CfpParams:
    """What the CFP renderer needs: the 6 CFP biomarkers, disc size, lesion counts, appearance."""

    values: dict[str, float]  #: the 6 CFP biomarkers (CFP_KEYS)
    disc_diameter_um: float
    drusen: int = 0
    haemorrhages: int = 0
    microaneurysms: int = 0
    exudates: int = 0
    cotton_wool: int = 0
    wet_lesion: bool = False
    arteriolar_reflex: bool = False
    pigment: float = 0.5  #: fundus pigmentation 0..1 (subject noise)
    brightness: float = 1.0


@dataclass(frozen=True)
class OctView:
    """Acquisition of the OCT cube: where the fovea falls, tilt, curvature, image quality."""

    fovea_x: float  #: mm from the scan centre
    fovea_y: float
    fovea_frame: int  #: 0-based index of the B-scan through the fovea
    tilt: float  #: px of BM rise per mm
    curvature: float  #: px per mm^2 (the edges rise)
    bm_row: float  #: BM row at the fovea
    gain: float
    speckle: float
    foci: tuple[tuple[float, float, float], ...] = ()  #: hyperreflective foci (x, y mm; depth fraction)


@dataclass(frozen=True)
class EyeTruth:
    eye: str
    label: Label
    subtype: str  #: "dry"/"wet" (AMD), "dme"/"npdr" (DR), "" otherwise
    retina: RetinaModel
    cfp: CfpParams
    oct: OctView
    biomarkers: dict[str, float]  #: all 37, BIOMARKERS order


@dataclass(frozen=True)
class SubjectTruth:
    subject_id: str
    label: Label
    age: int
    sex: str
    eyes: tuple[EyeTruth, EyeTruth]  #: (R, L)


def frame_y(frame: int, n_frames: int = N_FRAMES) -> float:
    """The y (mm from the scan centre, inferior positive) of a B-scan."""
    return -SCAN_MM / 2 + SCAN_MM * (frame + 0.5) / n_frames


def sample_subject(subject_id: str, label: Label, rng: np.random.Generator) -> SubjectTruth:
    """One subject of `label`: shared traits, then both eyes with small inter-eye differences."""
    age_mean, age_sd = _AGE.get(label, (60, 9))
    age = int(np.clip(round(rng.normal(age_mean, age_sd)), 40, 92))
    sex = "F" if rng.random() < 0.5 else "M"
    subtype = _subtype(label, rng)
    layer_trait = {layer: rng.normal(1.0, 0.045) for layer in PROFILE_LAYERS}
    cfp_trait = {key: rng.normal(0.0, 1.0) for key in CFP_KEYS}
    disc_mean, disc_sd = _DISC_UM.get(label, (1750.0, 110.0))
    disc = rng.normal(disc_mean, disc_sd)
    pigment = float(rng.uniform(0.2, 0.9))
    eyes = tuple(_sample_eye(eye, label, subtype, layer_trait, cfp_trait, disc, pigment, rng) for eye in ("R", "L"))
    return SubjectTruth(subject_id, label, age, sex, eyes)  # type: ignore[arg-type]


def _subtype(label: Label, rng: np.random.Generator) -> str:
    if label == Label.AMD:
        return "wet" if rng.random() < 0.4 else "dry"
    if label == Label.DIABETIC_RETINOPATHY:
        return "dme" if rng.random() < 0.6 else "npdr"
    return ""


def _sample_eye(
    eye: str,
    label: Label,
    subtype: str,
    layer_trait: dict[str, float],
    cfp_trait: dict[str, float],
    disc: float,
    pigment: float,
    rng: np.random.Generator,
) -> EyeTruth:
    scale = {}
    for layer in PROFILE_LAYERS:
        base = _OCT_SCALE[label].get(layer, (1.0, 1.0, 1.0))
        eye_factor = layer_trait[layer] * rng.normal(1.0, 0.012)
        scale[layer] = tuple(float(b * eye_factor * rng.normal(1.0, 0.02)) for b in base)
    drusen, fluid, cysts = _oct_lesions(label, subtype, rng)
    disc_eye = float(np.clip(disc * rng.normal(1.0, 0.02), *BY_KEY["disc_diameter_vertical"].plausible))
    retina = RetinaModel(
        eye, scale, _OCT_QUADRANT.get(label, {}), drusen, fluid, cysts, {"disc_diameter_vertical": disc_eye}
    )
    retina = _cap_thickness(retina)
    cfp = _cfp_params(label, subtype, cfp_trait, disc_eye, pigment, rng)
    view = _oct_view(label, subtype, rng)
    values = {**oct_biomarkers(retina), **cfp.values}
    return EyeTruth(eye, label, subtype, retina, cfp, view, values)


def _blobs(
    rng: np.random.Generator, n: int, spread: float, radius: tuple[float, float], height: tuple[float, float]
) -> tuple[Blob, ...]:
    out = []
    for _ in range(n):
        r = spread * math.sqrt(rng.random())
        a = rng.uniform(0, 2 * math.pi)
        out.append(Blob(r * math.cos(a), r * math.sin(a), float(rng.uniform(*radius)), float(rng.uniform(*height))))
    return tuple(out)


def _oct_lesions(label: Label, subtype: str, rng: np.random.Generator):
    drusen: tuple[Blob, ...] = ()
    fluid: tuple[Blob, ...] = ()
    cysts: tuple[Blob, ...] = ()
    if label == Label.AMD:
        drusen = _blobs(rng, int(rng.integers(8, 18)), 2.0, (0.15, 0.40), (30.0, 80.0))
        if subtype == "wet":
            fluid = _blobs(rng, 1, 0.3, (0.7, 1.3), (70.0, 150.0))
            drusen += _blobs(rng, 1, 0.4, (0.35, 0.6), (90.0, 160.0))  # pigment epithelial detachment
    elif label == Label.DIABETIC_RETINOPATHY:
        n = int(rng.integers(5, 12)) if subtype == "dme" else int(rng.integers(1, 4))
        cysts = _blobs(rng, n, 1.2, (0.2, 0.5), (35.0, 100.0) if subtype == "dme" else (20.0, 45.0))
    return drusen, fluid, cysts


def _cap_thickness(model: RetinaModel) -> RetinaModel:
    """Scale lesion heights down where ILM-BM would leave the B-scan's depth budget."""
    axis = np.linspace(-4.0, 4.0, 81)
    dx, dy = np.meshgrid(axis, axis)
    for _ in range(3):
        stack = layer_stack(model, dx, dy)
        total = total_thickness(stack)
        lesion = stack["drusen"] + stack["fluid"] + stack["cyst"]
        peak = float(total.max())
        if peak <= MAX_TOTAL_UM:
            return model
        i = int(total.argmax())
        factor = max(0.0, 1.0 - (peak - MAX_TOTAL_UM + 5.0) / max(float(lesion.flat[i]), 1e-6))
        model = RetinaModel(
            model.eye,
            model.scale,
            model.quadrant,
            *[
                tuple(Blob(b.x, b.y, b.radius, b.height * factor) for b in blobs)
                for blobs in (model.drusen, model.fluid, model.cysts)
            ],
            model.extra,
        )
    return model


def _cfp_params(
    label: Label, subtype: str, trait: dict[str, float], disc: float, pigment: float, rng: np.random.Generator
) -> CfpParams:
    spec = {**_CFP[Label.NORMAL], **_CFP[label]}
    values = {}
    for key in CFP_KEYS:
        mean, sd = spec[key]
        value = mean + sd * (0.8 * trait[key] + 0.6 * rng.normal())  # shared by both eyes, plus eye noise
        low, high = BY_KEY[key].plausible
        values[key] = float(np.clip(round(value, 3), low + 0.01, high - 0.01))
    counts = dict(drusen=0, haemorrhages=0, microaneurysms=0, exudates=0, cotton_wool=0)
    if label == Label.AMD:
        counts["drusen"] = int(rng.integers(18, 45))
    elif label == Label.DIABETIC_RETINOPATHY:
        counts.update(
            haemorrhages=int(rng.integers(6, 18)),
            microaneurysms=int(rng.integers(10, 30)),
            exudates=int(rng.integers(8, 30)) if subtype == "dme" else int(rng.integers(2, 8)),
            cotton_wool=int(rng.integers(0, 4)),
        )
    elif label == Label.HYPERTENSION:
        counts.update(cotton_wool=int(rng.integers(0, 2)), haemorrhages=int(rng.integers(0, 2)))
    return CfpParams(
        values,
        disc,
        **counts,
        wet_lesion=(subtype == "wet"),
        arteriolar_reflex=(label == Label.HYPERTENSION),
        pigment=pigment,
        brightness=float(rng.uniform(0.85, 1.1)),
    )


def _oct_view(label: Label, subtype: str, rng: np.random.Generator) -> OctView:
    fy = float(rng.uniform(-0.9, 0.9))
    frame = int(np.clip(round((fy + SCAN_MM / 2) * N_FRAMES / SCAN_MM - 0.5), 0, N_FRAMES - 1))
    fy = frame_y(frame) + float(rng.uniform(-0.04, 0.04))  # the fovea lies on (within 0.04 mm of) its frame
    foci: tuple[tuple[float, float, float], ...] = ()
    if label == Label.DIABETIC_RETINOPATHY:
        n = int(rng.integers(10, 30))
        foci = tuple(
            (float(rng.normal(0, 0.9)), float(rng.normal(0, 0.9)), float(rng.uniform(0.55, 0.8))) for _ in range(n)
        )
    return OctView(
        fovea_x=float(rng.uniform(-0.3, 0.3)),
        fovea_y=fy,
        fovea_frame=frame,
        tilt=float(rng.uniform(-4.0, 4.0)),
        curvature=float(rng.uniform(1.0, 2.2)),
        bm_row=float(rng.uniform(228.0, 236.0)),
        gain=float(rng.uniform(0.85, 1.1)),
        speckle=float(rng.uniform(0.25, 0.38)),
        foci=foci,
    )
