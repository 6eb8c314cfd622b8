"""Colour fundus photograph renderer: disc, cup, vessel tree, macula and lesions from the biomarkers.

Macula-centred 45-degree view of a right eye (a left eye is the mirror image): fovea at the centre, optic
disc 4.4 mm nasal. The optic disc's vertical diameter is the OCT biomarker `disc_diameter_vertical`, the
cup's is cup-to-disc x disc. Vessels grow from the disc as trees: calibre follows AVR (arteriole =
AVR x venule), each vessel's sinusoidal meander makes its arc/chord ratio follow the tortuosity, and the
number of side branches per vessel grows with the fractal dimension (more branching, higher box-counting
dimension). Vessels are drawn at 2x and downsampled, so their calibre has half-pixel resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from training.phantom.sampling import CfpParams

CFP_SIZE = 448
PX_PER_MM = CFP_SIZE / 13.0  #: 45-degree field: about 13 mm of retina across the image
DISC_OFFSET_MM = (4.4, -0.3)  #: disc centre from the fovea (nasal, superior negative y), right eye
VENULE_TRUNK_UM = 250.0  #: drawn calibre of a main venule (exaggerated ~1.7x for visibility)
_SS = 2  #: vessel supersampling factor
BRANCHES_PER_FD = 13.0  #: extra side branches per vessel per unit of fractal dimension above 1.25
_ARTERY_RGB = (205, 62, 42)
_VEIN_RGB = (128, 22, 24)


@dataclass(frozen=True)
class CfpRender:
    rgb: np.ndarray  #: uint8 [CFP_SIZE, CFP_SIZE, 3]
    artery_mask: np.ndarray  #: float 0..1, the drawn arterioles (for tests and QA)
    vein_mask: np.ndarray
    disc_center: tuple[float, float]  #: (x, y) px
    disc_radius: float  #: vertical radius, px
    cup_radius: float


def render_cfp(params: CfpParams, eye: str, rng: np.random.Generator) -> CfpRender:
    """Render one eye's fundus photograph (mirrored for the left eye)."""
    fovea = (CFP_SIZE / 2 + rng.uniform(-6, 6), CFP_SIZE / 2 + rng.uniform(-6, 6))
    disc = (fovea[0] + DISC_OFFSET_MM[0] * PX_PER_MM, fovea[1] + DISC_OFFSET_MM[1] * PX_PER_MM)
    disc_r = params.disc_diameter_um / 1000.0 * PX_PER_MM / 2
    cup_r = params.values["cup_to_disc"] * disc_r
    image = _background(params, fovea, rng)
    _draw_disc(image, disc, disc_r, cup_r)
    artery, vein = _vessel_masks(params, disc, disc_r, fovea, rng)
    _blend(image, vein, _VEIN_RGB, 0.92)
    _blend(image, artery, _ARTERY_RGB, 0.9)
    if params.arteriolar_reflex:  # "copper wiring": a bright axial reflex along the arterioles
        core = Image.fromarray((artery * 255).astype(np.uint8)).filter(ImageFilter.MinFilter(3))
        _blend(image, np.asarray(core, dtype=np.float32) / 255.0, (230, 135, 95), 0.55)
    image = _lesions(image, params, fovea, disc, rng)
    rgb = _finish(image, rng)
    if eye == "L":
        rgb, artery, vein = rgb[:, ::-1].copy(), artery[:, ::-1].copy(), vein[:, ::-1].copy()
        disc = (CFP_SIZE - 1 - disc[0], disc[1])
    return CfpRender(rgb, artery, vein, disc, disc_r, cup_r)


@lru_cache(maxsize=2)
def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return xx, yy


def _background(params: CfpParams, fovea: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Orange-red fundus with vignetting, choroidal mottling, a darker macula and a foveal reflex."""
    xx, yy = _coords(CFP_SIZE)
    c = CFP_SIZE / 2
    r = np.hypot(xx - c, yy - c) / c
    pig = params.pigment
    base = np.array([205 - 50 * pig, 95 - 35 * pig, 40 - 15 * pig], dtype=np.float32) * params.brightness
    vignette = np.clip(1.08 - 0.45 * r**2, 0.2, None)
    small = rng.uniform(0.88, 1.12, size=(14, 14)).astype(np.float32)
    mottle = np.asarray(Image.fromarray(small).resize((CFP_SIZE, CFP_SIZE), Image.BICUBIC))
    macula_d2 = ((xx - fovea[0]) ** 2 + (yy - fovea[1]) ** 2) / (1.1 * PX_PER_MM) ** 2
    macula = 1.0 - 0.32 * np.exp(-macula_d2)
    image = base[None, None, :] * (vignette * mottle * macula)[..., None]
    reflex = np.exp(-macula_d2 * 120.0)[..., None] * 60.0
    return image + reflex


def _draw_disc(image: np.ndarray, disc: tuple[float, float], disc_r: float, cup_r: float) -> None:
    """Yellow-pink neuroretinal rim with a pale cup (vertical radii disc_r, cup_r; slightly oval)."""
    xx, yy = _coords(CFP_SIZE)
    d_disc = np.hypot((xx - disc[0]) / (0.92 * disc_r), (yy - disc[1]) / disc_r)
    rim = np.clip((1.0 - d_disc) * disc_r / 2.0, 0, 1)[..., None]  # 2 px soft edge
    image[:] = image * (1 - rim) + np.array([238, 168, 112], np.float32) * rim
    cx = disc[0] - 0.12 * (disc_r - cup_r)  # the cup sits slightly temporal
    d_cup = np.hypot((xx - cx) / (0.9 * cup_r), (yy - disc[1]) / cup_r)
    cup = np.clip((1.0 - d_cup) * cup_r / 2.5, 0, 1)[..., None]
    image[:] = image * (1 - cup) + np.array([250, 232, 196], np.float32) * cup


def _blend(image: np.ndarray, mask: np.ndarray, rgb: tuple[int, int, int], opacity: float) -> None:
    a = (mask * opacity)[..., None]
    image[:] = image * (1 - a) + np.array(rgb, np.float32) * a


def _vessel_masks(params: CfpParams, disc, disc_r, fovea, rng) -> tuple[np.ndarray, np.ndarray]:
    """Artery and vein masks (0..1) drawn at 2x and downsampled."""
    v = params.values
    venule_w = VENULE_TRUNK_UM / 1000.0 * PX_PER_MM * math.sqrt(0.78 / v["avr"])
    out = []
    for kind, width, tort, fd in (
        ("artery", v["avr"] * venule_w, v["tortuosity_arterial"], v["fd_arterial"]),
        ("vein", venule_w, v["tortuosity_venular"], v["fd_venular"]),
    ):
        canvas = Image.new("L", (CFP_SIZE * _SS, CFP_SIZE * _SS), 0)
        draw = ImageDraw.Draw(canvas)
        for heading, curl, length in _trunks(kind, disc, fovea):
            start = (disc[0] + 0.45 * disc_r * math.cos(heading), disc[1] - 0.45 * disc_r * math.sin(heading))
            _grow(draw, rng, _Vessel(start, heading, curl, length, width), _Tree(tort, fd), depth=0)
        small = canvas.resize((CFP_SIZE, CFP_SIZE), Image.BOX)
        out.append(np.asarray(small, dtype=np.float32) / 255.0)
    return out[0], out[1]


def _trunks(kind: str, disc, fovea) -> list[tuple[float, float, float]]:
    """(initial heading rad, curl rad/px, length px) of the four main vessels of a right eye."""
    s = -0.06 if kind == "artery" else 0.06  # arteries and veins leave the disc side by side
    L = PX_PER_MM
    return [
        (math.radians(115) + s, 0.0085, 9.0 * L),  # superotemporal arcade, curling around the macula
        (math.radians(-115) - s, -0.0085, 9.0 * L),  # inferotemporal
        (math.radians(60) + s, -0.002, 5.5 * L),  # superonasal
        (math.radians(-60) - s, 0.002, 5.5 * L),  # inferonasal
    ]


class _Vessel(NamedTuple):
    """One vessel to draw: where it starts (px), its heading and curl (rad, rad/px), its length and width (px)."""

    start: tuple[float, float]
    heading: float
    curl: float
    length: float
    width: float


class _Tree(NamedTuple):
    """What all vessels of one tree (the arteries, or the veins) share."""

    tortuosity: float
    fd: float  #: fractal dimension: sets the number of side branches


def _grow(draw: ImageDraw.ImageDraw, rng: np.random.Generator, vessel: _Vessel, tree: _Tree, depth: int) -> None:
    """Draw one vessel (a curling path with a sinusoidal meander) and recurse into its side branches."""
    start, heading, curl, length, width = vessel
    tortuosity, fd = tree
    step = 3.0
    n = max(int(length / step), 2)
    wavelength = rng.uniform(26.0, 40.0)
    amp = wavelength / math.pi * math.sqrt(max(tortuosity - 1.0, 0.0))
    phase = rng.uniform(0, 2 * math.pi)
    turns = np.concatenate([[0.0], np.cumsum(curl + rng.normal(0, 0.012, n - 1))])
    heads = heading + turns
    x = start[0] + np.concatenate([[0.0], np.cumsum(step * np.cos(heads[:-1]))])
    y = start[1] - np.concatenate([[0.0], np.cumsum(step * np.sin(heads[:-1]))])
    inside = (x > -20) & (x < CFP_SIZE + 20) & (y > -20) & (y < CFP_SIZE + 20)
    n = int(np.argmin(inside)) if not inside.all() else n
    if n < 2:
        return
    s = np.arange(n) * step
    off = amp * np.sin(2 * np.pi * s / wavelength + phase) * np.minimum(1.0, s / wavelength)
    px = _SS * (x[:n] - off * np.sin(heads[:n]))
    py = _SS * (y[:n] - off * np.cos(heads[:n]))
    draw.line(list(zip(px.tolist(), py.tolist())), fill=255, width=max(1, int(round(width * _SS))))
    if depth >= 3 or width < 1.3:
        return
    expected = 1.0 + (fd - 1.25) * BRANCHES_PER_FD  # side branches per vessel: the fractal dimension's handle
    count = int(expected) + (1 if rng.random() < expected - int(expected) else 0)
    for j in range(count):
        k = int(n * (j + rng.uniform(0.3, 0.9)) / (count + 0.5))
        if k >= n:
            continue
        side = 1 if (j + depth) % 2 == 0 else -1
        branch = _Vessel(  # the arguments draw from rng in this order: keep it (renders are seeded)
            (px[k] / _SS, py[k] / _SS),
            heads[k] + side * rng.uniform(0.5, 1.0),
            rng.normal(0, 0.004),
            length * rng.uniform(0.4, 0.6),
            width * 0.72,
        )
        _grow(draw, rng, branch, tree, depth + 1)


def _spots(rng, n: int, center, spread_mm: float, radius: tuple[float, float]):
    for _ in range(n):
        r = spread_mm * PX_PER_MM * math.sqrt(rng.random())
        a = rng.uniform(0, 2 * math.pi)
        yield center[0] + r * math.cos(a), center[1] + r * math.sin(a), rng.uniform(*radius)


def _lesions(image: np.ndarray, p: CfpParams, fovea, disc, rng: np.random.Generator) -> np.ndarray:
    """Drusen, haemorrhages, microaneurysms, exudates, cotton-wool spots and a wet macular lesion."""
    layer = Image.new("RGBA", (CFP_SIZE, CFP_SIZE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)

    def dots(spots, rgba):
        for x, y, r in spots:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=rgba)

    if p.wet_lesion:
        dots(_spots(rng, 3, fovea, 0.4, (0.5 * PX_PER_MM, 0.9 * PX_PER_MM)), (110, 22, 16, 215))
        dots(_spots(rng, 1, fovea, 0.2, (0.35 * PX_PER_MM, 0.5 * PX_PER_MM)), (150, 140, 105, 230))
    dots(_spots(rng, p.drusen, fovea, 1.8, (2.0, 5.5)), (236, 205, 110, 220))
    dots(_spots(rng, p.haemorrhages, fovea, 4.5, (3.0, 7.5)), (105, 14, 12, 230))
    dots(_spots(rng, p.microaneurysms, fovea, 3.5, (1.3, 2.2)), (125, 10, 10, 255))
    if p.exudates:
        center = next(_spots(rng, 1, fovea, 1.5, (1, 1)))[:2]
        dots(_spots(rng, p.exudates, center, 1.2, (1.5, 3.5)), (248, 232, 125, 255))
    cotton = list(_spots(rng, p.cotton_wool, disc, 3.0, (6.0, 11.0)))
    dots(cotton, (238, 236, 218, 190))
    layer = layer.filter(ImageFilter.GaussianBlur(0.8))
    arr = np.asarray(layer, dtype=np.float32)
    alpha = arr[..., 3:4] / 255.0
    return image * (1 - alpha) + arr[..., :3] * alpha


def _finish(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise, a slight optical blur and the black circular field stop."""
    image = image + rng.normal(0.0, 3.0, size=image.shape).astype(np.float32)
    xx, yy = _coords(CFP_SIZE)
    c = CFP_SIZE / 2
    inside = np.clip((0.985 * c - np.hypot(xx - c, yy - c)) / 2.0, 0, 1)[..., None]
    rgb = np.clip(image * inside, 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(0.6)))
