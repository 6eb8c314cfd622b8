"""The phantom retina's layer anatomy, and the OCT biomarkers measured from it.

One function, `layer_stack`, gives every rendered layer's thickness (um) at any macular position; the OCT
renderer draws exactly these thicknesses and `oct_biomarkers` integrates exactly these thicknesses over
the ETDRS grid. So the 31 OCT biomarkers of a phantom eye are true measurements of its own images, not
numbers drawn next to them. Positions are in mm relative to the fovea, x to the image right, y inferior.

Layers, from Bruch's membrane (BM) up: drusen, RPE, subretinal fluid, photoreceptor outer segments
(ISOS-RPE), inner segments (ELM-ISOS), outer nuclear + plexiform layer, intraretinal cysts, INL, GCIPL,
RNFL. Biomarker groups: RPE thickness = RPE + drusen; ISOS-RPE = outer segments + subretinal fluid;
INL-ELM = INL + ONL/OPL + cysts; INL-RPE = INL-ELM + ELM-ISOS + ISOS-RPE; macular thickness = ILM to BM.
Layer "averages" (INL-ELM average, ...) are the mean of the central, inner and outer subfield values,
the convention of grok_pacs.domain.biomarkers' normal ranges; "overall macular thickness" is area-weighted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from grok_pacs.domain.biomarkers import OCT_KEYS

LAYERS = ("drusen", "rpe", "fluid", "os", "is", "onl", "cyst", "inl", "gcipl", "rnfl")
PROFILE_LAYERS = ("rpe", "os", "is", "onl", "inl", "gcipl", "rnfl")  #: layers with a radial profile
SUBFIELDS = ("central", "inner", "outer")
QUADRANTS = ("nasal", "superior", "temporal", "inferior")
CENTRAL_R, INNER_R, OUTER_R = 0.5, 1.5, 3.0  #: ETDRS radii, mm

_KNOTS_R = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.5])
#: Healthy radial profiles (um at _KNOTS_R), tuned so their subfield values sit inside the normal ranges of
#: grok_pacs.domain.biomarkers (see tests/training/test_phantom.py).
_TEMPLATE = {
    "rnfl": (1.5, 5.0, 14.0, 23.0, 30.0, 38.0, 44.0, 49.0, 52.0, 54.0),
    "gcipl": (6.0, 28.0, 80.0, 112.0, 117.0, 105.0, 89.0, 77.0, 70.0, 66.0),
    "inl": (3.0, 14.0, 34.0, 44.0, 45.0, 41.0, 36.0, 33.0, 31.0, 30.0),
    "onl": (106.0, 93.0, 68.0, 55.0, 49.0, 46.0, 44.0, 42.5, 41.5, 41.0),
    "is": (27.0, 26.0, 24.0, 22.5, 21.5, 20.5, 20.0, 19.5, 19.0, 18.5),
    "os": (46.0, 45.0, 42.0, 40.0, 38.5, 37.0, 35.5, 34.5, 33.5, 33.0),
    "rpe": (20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0),
}
#: Quadrant asymmetry of the healthy inner retina (fraction; nasal, superior, temporal, inferior).
_QUADRANT_SHAPE = {"rnfl": (0.22, 0.08, -0.32, 0.02), "gcipl": (0.03, 0.01, -0.05, 0.01)}
_QUADRANT_ANGLE = {"nasal": 0.0, "superior": np.pi / 2, "temporal": np.pi, "inferior": 3 * np.pi / 2}


@dataclass(frozen=True)
class Blob:
    """A dome-shaped lesion: drusen (under the RPE), fluid (subretinal) or a cyst (intraretinal)."""

    x: float  #: mm from the fovea
    y: float
    radius: float  #: mm
    height: float  #: um at the centre


@dataclass(frozen=True)
class RetinaModel:
    """Everything that fixes one eye's layer anatomy. `scale[layer]` = factors for (central, inner, outer)."""

    eye: str  #: "R" or "L" (nasal is +x for R, -x for L)
    scale: dict[str, tuple[float, float, float]]
    quadrant: dict[str, tuple[float, float, float, float]]  #: extra per-quadrant factor (N, S, T, I)
    drusen: tuple[Blob, ...] = ()
    fluid: tuple[Blob, ...] = ()
    cysts: tuple[Blob, ...] = ()
    extra: dict[str, float] = field(default_factory=dict)  #: e.g. disc diameter (not a layer)


def _smooth_interp(r: np.ndarray, knots: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Interpolation through knots with a cosine ease, so profiles have no kinks at the knots."""
    r = np.clip(r, knots[0], knots[-1])
    idx = np.clip(np.searchsorted(knots, r, side="right") - 1, 0, len(knots) - 2)
    t = (r - knots[idx]) / (knots[idx + 1] - knots[idx])
    t = 0.5 - 0.5 * np.cos(np.pi * t)
    return values[idx] + (values[idx + 1] - values[idx]) * t


def _subfield_factor(r: np.ndarray, factors: tuple[float, float, float]) -> np.ndarray:
    """Per-subfield scale factors blended smoothly across the ETDRS ring borders."""
    knots = np.array([0.0, 0.35, 0.65, 1.35, 1.65, 4.5])
    c, i, o = factors
    return _smooth_interp(r, knots, np.array([c, c, i, i, o, o]))


def _quadrant_weights(dx: np.ndarray, dy: np.ndarray, eye: str) -> dict[str, np.ndarray]:
    """Smooth per-quadrant weights (sum 1) from the angle around the fovea; nasal is toward the disc."""
    nasal_x = dx if eye == "R" else -dx
    theta = np.arctan2(-dy, nasal_x)  # superior is -y (image up)
    return {q: np.clip(np.cos(theta - a), 0.0, None) ** 2 for q, a in _QUADRANT_ANGLE.items()}


def _blob_height(dx: np.ndarray, dy: np.ndarray, blobs: tuple[Blob, ...]) -> np.ndarray:
    out = np.zeros(np.broadcast(dx, dy).shape)
    for b in blobs:
        d2 = ((dx - b.x) ** 2 + (dy - b.y) ** 2) / (b.radius**2)
        out += b.height * np.sqrt(np.clip(1.0 - d2, 0.0, None))
    return out


def layer_stack(model: RetinaModel, dx: np.ndarray, dy: np.ndarray) -> dict[str, np.ndarray]:
    """Thickness (um) of every layer in LAYERS at positions (dx, dy) mm from the fovea."""
    dx, dy = np.broadcast_arrays(np.asarray(dx, float), np.asarray(dy, float))
    r = np.hypot(dx, dy)
    weights = _quadrant_weights(dx, dy, model.eye)
    out: dict[str, np.ndarray] = {}
    for layer in PROFILE_LAYERS:
        base = _smooth_interp(r, _KNOTS_R, np.asarray(_TEMPLATE[layer]))
        thick = base * _subfield_factor(r, model.scale[layer])
        shape = _QUADRANT_SHAPE.get(layer, (0.0, 0.0, 0.0, 0.0))
        extra = model.quadrant.get(layer, (1.0, 1.0, 1.0, 1.0))
        ring = np.clip((r - 0.3) / 0.7, 0.0, 1.0)  # asymmetry fades toward the foveal centre
        factor = sum(w * ((1.0 + s * ring) * e) for w, s, e in zip(weights.values(), shape, extra))
        out[layer] = thick * factor
    out["drusen"] = _blob_height(dx, dy, model.drusen)
    # photoreceptor nuclei are lost over drusen: the ONL thins by half the druse's height
    out["onl"] = out["onl"] - np.minimum(0.5 * out["drusen"], 0.6 * out["onl"])
    out["fluid"] = _blob_height(dx, dy, model.fluid)
    out["cyst"] = _blob_height(dx, dy, model.cysts)
    return {layer: out[layer] for layer in LAYERS}


def total_thickness(stack: dict[str, np.ndarray]) -> np.ndarray:
    return sum(stack[layer] for layer in LAYERS)


@dataclass(frozen=True)
class _Grid:
    dx: np.ndarray
    dy: np.ndarray
    masks: dict[str, np.ndarray]  #: "central", "inner", "outer", "inner_nasal", ..., "all"


def _grid(eye: str, step: float = 0.03) -> _Grid:
    axis = np.arange(-OUTER_R + step / 2, OUTER_R, step)
    dx, dy = np.meshgrid(axis, axis)
    r = np.hypot(dx, dy)
    masks = {
        "central": r < CENTRAL_R,
        "inner": (r >= CENTRAL_R) & (r < INNER_R),
        "outer": (r >= INNER_R) & (r < OUTER_R),
        "all": r < OUTER_R,
    }
    nasal_x = dx if eye == "R" else -dx
    theta = np.mod(np.arctan2(-dy, nasal_x), 2 * np.pi)
    for q, a in _QUADRANT_ANGLE.items():
        sector = np.abs(np.angle(np.exp(1j * (theta - a)))) < np.pi / 4
        for ring in ("inner", "outer"):
            masks[f"{ring}_{q}"] = masks[ring] & sector
    return _Grid(dx, dy, masks)


_GRIDS: dict[str, _Grid] = {}


def oct_biomarkers(model: RetinaModel) -> dict[str, float]:
    """The 31 OCT biomarkers of the eye, measured on its anatomy over the ETDRS grid (OCT_KEYS order)."""
    if model.eye not in _GRIDS:
        _GRIDS[model.eye] = _grid(model.eye)
    grid = _GRIDS[model.eye]
    s = layer_stack(model, grid.dx, grid.dy)
    total = total_thickness(s)
    groups = {
        "inl_elm": s["inl"] + s["onl"] + s["cyst"],
        "elm_isos": s["is"],
        "isos_rpe": s["os"] + s["fluid"],
    }
    groups["inl_rpe"] = groups["inl_elm"] + groups["elm_isos"] + groups["isos_rpe"]

    def mean(a: np.ndarray, region: str) -> float:
        return float(a[grid.masks[region]].mean())

    def three(a: np.ndarray) -> float:
        return float(np.mean([mean(a, sub) for sub in SUBFIELDS]))

    values: dict[str, float] = {}
    for ring in ("inner", "outer"):
        for side in ("inferior", "nasal", "superior", "temporal"):
            values[f"mt_{ring}_{side}"] = mean(total, f"{ring}_{side}")
    values["rpe_average"] = three(s["rpe"] + s["drusen"])
    values["disc_diameter_vertical"] = float(model.extra["disc_diameter_vertical"])
    values["inl_average"] = three(s["inl"])
    values["gcipl_average"] = three(s["gcipl"])
    for name, arr in groups.items():
        for sub in SUBFIELDS:
            values[f"{name}_{sub}"] = mean(arr, sub)
        values[f"{name}_average"] = float(np.mean([values[f"{name}_{sub}"] for sub in SUBFIELDS]))
    values["mt_overall"] = mean(total, "all")
    values["mt_central"] = mean(total, "central")
    values["rnfl_average"] = three(s["rnfl"])
    return {key: values[key] for key in OCT_KEYS}
