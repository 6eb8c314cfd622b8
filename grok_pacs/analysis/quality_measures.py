"""The gate's pixel measures (what `grok_pacs.analysis.quality` judges against its thresholds).

CFP, at a fixed working size (WORK_SIDE) so the measures do not depend on the camera: field coverage and
centring, exposure, saturation, contrast, sharpness (normalised variance of the Laplacian), decoder fill
(block rows one JPEG tile repeats) and isotropy (motion blur: fine-detail energy along rows vs columns and
along the two diagonals, the weaker over the stronger; a fundus has vessels in every direction, so a still
capture scores close to 1 and a capture smeared along one direction far less). OCT: blank and saturated frames, signal
strength, and the largest axial jump of the retina between adjacent B-scans (eye motion during the scan
moves whole B-scans up or down; a still volume moves a few per cent of the B-scan height at most).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

WORK_SIDE = 512  #: CFP measures are taken at this shorter side (resolution independence)
#: Second differences along rows, columns and both diagonals: (row step, column step).
_DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))


def _laplacian(img: np.ndarray) -> np.ndarray:
    return img[1:-1, :-2] + img[1:-1, 2:] + img[:-2, 1:-1] + img[2:, 1:-1] - 4 * img[1:-1, 1:-1]


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        out[1:-1, 1:-1] &= out[:-2, 1:-1] & out[2:, 1:-1] & out[1:-1, :-2] & out[1:-1, 2:]
        out[0], out[-1], out[:, 0], out[:, -1] = False, False, False, False
    return out


def _decoder_fill(rgb: np.ndarray) -> float:
    """Fraction of 16-px block rows made of one repeated, lit 16x16 tile across the whole width.

    A JPEG decoder that meets corrupted entropy-coded data fills the rest of the frame with one repeated
    MCU; a photograph never repeats a lit tile exactly across its width (the field is round, sensors noisy).
    """
    h, w = (rgb.shape[0] // 16) * 16, (rgb.shape[1] // 16) * 16
    if h == 0 or w < 32:
        return 0.0
    tiles = rgb[:h, :w].reshape(h // 16, 16, w // 16, 16, -1)
    repeated = (tiles == tiles[:, :, :1]).all(axis=(1, 2, 3, 4))
    level = tiles[:, :, 0].reshape(h // 16, -1).mean(axis=1)
    return float((repeated & (level > 20) & (level < 250)).mean())


def cfp_measures(rgb: np.ndarray) -> dict[str, float]:
    """The CFP quality measures (module docstring), from uint8 [H, W, 3]."""
    scale = WORK_SIDE / min(rgb.shape[:2])
    size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    work = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR), dtype=np.float32) / 255.0
    native = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / np.float32(255.0)
    lum = np.asarray(Image.fromarray(native, "F").resize(size, Image.BILINEAR))  # float: no re-quantisation
    field = lum > 0.06
    coverage = float(field.mean())
    m: dict[str, float] = {"field_coverage": coverage, "decoder_fill": _decoder_fill(rgb)}
    if coverage == 0.0:
        return {
            **m,
            "field_offset": 1.0,
            "exposure": 0.0,
            "saturated": 0.0,
            "contrast": 0.0,
            "sharpness": 0.0,
            "isotropy": 0.0,
        }
    yy, xx = np.nonzero(field)
    m["field_offset"] = float(np.hypot(yy.mean() / lum.shape[0] - 0.5, xx.mean() / lum.shape[1] - 0.5))
    inside = lum[field]
    m["exposure"] = float(inside.mean())
    m["saturated"] = float((work[field] >= 250 / 255).all(axis=-1).mean())
    m["contrast"] = float(inside.std())
    core = _erode(field, 6)[1:-1, 1:-1]
    lap = _laplacian(lum)[core]
    spread = float(lum[1:-1, 1:-1][core].std()) if lap.size > 16 else 0.0
    m["sharpness"] = float(lap.std() / spread) if spread > 1e-6 else 0.0
    m["isotropy"] = _isotropy(lum, core)
    return m


def oct_measures(volume: np.ndarray, full_scale: float) -> dict[str, float]:
    """The OCT quality measures (module docstring), from [frames, rows, cols] and the sample full scale."""
    data = volume.astype(np.float32) / np.float32(full_scale)
    flat = data.reshape(data.shape[0], -1)
    blank = flat.std(axis=1) < 0.01
    saturated = (flat >= 0.98).mean(axis=1) > 0.5
    n = data.shape[0]
    central = flat[max(0, n // 2 - 1) : n // 2 + 2]
    signal = np.percentile(central, 99, axis=1) - np.median(central, axis=1)
    return {
        "blank_frames": float(blank.mean()),
        "saturated_frames": float(saturated.mean()),
        "signal": float(np.median(signal)),
        "central_blank": float(blank[n // 2]),
        "axial_jump": _axial_jump(data, blank),
    }


def _isotropy(lum: np.ndarray, core: np.ndarray) -> float:
    """The std of the second difference inside `core` along rows vs columns, and along the two diagonals:
    the smaller of the two pairs' min / max ratios (1: isotropic). Pairs, because a diagonal step is longer
    than an axial one and so sees more of the image's slope."""
    if not core.any():
        return 0.0
    h, w = lum.shape
    centre, inside = lum[2:-2, 2:-2], core[1:-1, 1:-1]
    energies = []
    for dy, dx in _DIRECTIONS:
        before = lum[2 - dy : h - 2 - dy, 2 - dx : w - 2 - dx]
        after = lum[2 + dy : h - 2 + dy, 2 + dx : w - 2 + dx]
        energies.append(float((before + after - 2 * centre)[inside].std()))
    ratios = [min(pair) / max(pair) if max(pair) > 1e-9 else 0.0 for pair in (energies[:2], energies[2:])]
    return min(ratios)


def _axial_jump(data: np.ndarray, blank: np.ndarray) -> float:
    """Largest move of the retina's depth (the centroid of each B-scan's depth profile above its median)
    between adjacent non-blank B-scans, as a fraction of the B-scan height; 0 with fewer than two."""
    profile = data.mean(axis=2)
    profile = np.maximum(profile - np.median(profile, axis=1, keepdims=True), 0)
    weight = profile.sum(axis=1)
    keep = ~blank & (weight > 1e-6)
    if keep.sum() < 2:
        return 0.0
    depth = (profile * np.arange(profile.shape[1])).sum(axis=1)[keep] / weight[keep]
    return float(np.abs(np.diff(depth)).max() / profile.shape[1])
