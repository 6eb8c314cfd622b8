"""OCT volume renderer: B-scans whose layer boundaries are exactly the phantom anatomy's thicknesses.

Geometry (documented in docs/cohort-manifest.md): a 6 x 6 mm cube, N_FRAMES horizontal B-scans from
superior (frame 0) to inferior, each OCT_WIDTH x OCT_HEIGHT pixels; lateral 6 mm / OCT_WIDTH px,
axial AXIAL_UM_PER_PX um per pixel (stretched about 2x against a real device, so a 224 x 224 resize keeps
RNFL/GCIPL/RPE differences of a few um visible). Layer k of the anatomy occupies rows
[BM - top_k / AXIAL_UM_PER_PX, BM - bottom_k / AXIAL_UM_PER_PX), before speckle and a light blur.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from training.phantom.anatomy import layer_stack
from training.phantom.sampling import N_FRAMES, SCAN_MM, EyeTruth, frame_y

OCT_WIDTH = 256
OCT_HEIGHT = 256
AXIAL_UM_PER_PX = 2.0
LATERAL_UM_PER_PX = SCAN_MM * 1000.0 / OCT_WIDTH

#: Render bands bottom (BM) to top (ILM): (anatomy layer, fraction of it, reflectivity 0..255).
_BANDS: tuple[tuple[str, float, float], ...] = (
    ("drusen", 1.0, 150.0),
    ("rpe", 1.0, 235.0),
    ("fluid", 1.0, 10.0),
    ("os", 1.0, 112.0),
    ("is", 0.3, 215.0),  # ellipsoid zone (the IS/OS line)
    ("is", 0.7, 82.0),
    ("onl", 0.35, 48.0),
    ("cyst", 1.0, 8.0),
    ("onl", 0.45, 48.0),
    ("onl", 0.2, 150.0),  # outer plexiform layer
    ("inl", 1.0, 66.0),
    ("gcipl", 1.0, 128.0),
    ("rnfl", 1.0, 205.0),
)
_VITREOUS = 7.0
_ELM_BOOST = 55.0


def band_boundaries(truth: EyeTruth, n_frames: int = N_FRAMES) -> tuple[np.ndarray, np.ndarray]:
    """(BM row per frame/column [N, W], cumulative band tops in um [len(_BANDS)+1, N, W])."""
    view = truth.oct
    x = -SCAN_MM / 2 + SCAN_MM * (np.arange(OCT_WIDTH) + 0.5) / OCT_WIDTH
    y = np.array([frame_y(k, n_frames) for k in range(n_frames)])
    dx = (x - view.fovea_x)[None, :]
    dy = (y - view.fovea_y)[:, None]
    stack = layer_stack(truth.retina, dx, dy)
    tops = [np.zeros((n_frames, OCT_WIDTH))]
    for layer, fraction, _ in _BANDS:
        tops.append(tops[-1] + stack[layer] * fraction)
    bm = view.bm_row - view.curvature * (dx**2 + dy**2) + view.tilt * dx
    return bm, np.stack(tops)


def render_volume(truth: EyeTruth, rng: np.random.Generator, n_frames: int = N_FRAMES) -> np.ndarray:
    """The eye's OCT cube as uint8 [n_frames, OCT_HEIGHT, OCT_WIDTH]."""
    view = truth.oct
    bm, tops = band_boundaries(truth, n_frames)
    rows = np.arange(OCT_HEIGHT, dtype=np.float32)[None, :, None]
    height_um = (bm[:, None, :].astype(np.float32) - rows) * np.float32(AXIAL_UM_PER_PX)  # [N, H, W] um above BM
    index = np.zeros(height_um.shape, dtype=np.int8)
    for top in tops:
        index += height_um >= top[:, None, :].astype(np.float32)
    lut = np.array([0.0, *[b[2] for b in _BANDS], _VITREOUS], dtype=np.float32)
    image = lut[index]
    choroid = index == 0
    image[choroid] = _choroid(height_um, rng, n_frames)[choroid]
    _add_elm(image, bm, tops)
    _add_foci(image, truth, bm, tops, n_frames)
    image *= view.gain
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    image *= np.exp(view.speckle * noise - view.speckle**2 / 2)
    image += 3.0 * rng.standard_normal(image.shape, dtype=np.float32)
    image = _blur(image)
    return np.clip(image, 0, 255).astype(np.uint8)


def _choroid(height_um: np.ndarray, rng: np.random.Generator, n_frames: int) -> np.ndarray:
    """Choroid below BM: reflectivity fading with depth, mottled by dark vessel lumina."""
    small = rng.uniform(0.3, 1.5, size=(n_frames, OCT_HEIGHT // 8, OCT_WIDTH // 8)).astype(np.float32)
    tex = np.stack([np.asarray(Image.fromarray(s).resize((OCT_WIDTH, OCT_HEIGHT), Image.BILINEAR)) for s in small])
    depth = np.clip(-height_um, 0, None)
    return 30.0 + 95.0 * np.exp(-depth / 90.0) * tex


def _add_elm(image: np.ndarray, bm: np.ndarray, tops: np.ndarray) -> None:
    """The external limiting membrane: a thin bright line at the top of the inner segments."""
    elm_um = tops[6]  # top of the second "is" band
    row = np.round(bm - elm_um / AXIAL_UM_PER_PX).astype(int)
    frames, cols = np.indices(row.shape)
    ok = (row >= 0) & (row < OCT_HEIGHT)
    image[frames[ok], row[ok], cols[ok]] += _ELM_BOOST


def _add_foci(image: np.ndarray, truth: EyeTruth, bm: np.ndarray, tops: np.ndarray, n_frames: int) -> None:
    """Hyperreflective foci (hard exudates) in the outer plexiform region, where a B-scan crosses them."""
    view = truth.oct
    for fx, fy, depth_fraction in view.foci:
        for k in range(n_frames):
            if abs(frame_y(k, n_frames) - (fy + view.fovea_y)) > 0.12:
                continue
            col = int((fx + view.fovea_x + SCAN_MM / 2) / SCAN_MM * OCT_WIDTH)
            if not 2 <= col < OCT_WIDTH - 2:
                continue
            row = int(bm[k, col] - depth_fraction * tops[-1][k, col] / AXIAL_UM_PER_PX)
            if 2 <= row < OCT_HEIGHT - 2:
                image[k, row - 1 : row + 2, col - 2 : col + 3] = 245.0


def _blur(image: np.ndarray) -> np.ndarray:
    """A separable [1, 2, 1] / 4 blur in both in-plane directions (the optics' point spread)."""
    out = image.copy()
    out[:, 1:-1, :] = 0.25 * image[:, :-2, :] + 0.5 * image[:, 1:-1, :] + 0.25 * image[:, 2:, :]
    tmp = out.copy()
    out[:, :, 1:-1] = 0.25 * tmp[:, :, :-2] + 0.5 * tmp[:, :, 1:-1] + 0.25 * tmp[:, :, 2:]
    return out
