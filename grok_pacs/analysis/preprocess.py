"""Model-input preprocessing, shared by stage 2, stage 3 and the runtime (one function each, no drift).

CFP (docs/domain.md, The GROK model): pad to a square with the image's mean colour, resize to 224, ImageNet
normalisation.
OCT: the foveal B-scan of the volume (`select_foveal_bscan`), padded to a square with its background level,
resized to 224, replicated to 3 channels, ImageNet normalisation (RETFound's OCT input).
Outputs are float32 numpy [3, 224, 224]: the ONNX encoders take them directly; torch.from_numpy for torch.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from grok_pacs.model.config import IMAGENET_MEAN, IMAGENET_STD

IMAGE_SIZE = 224
#: Minimum pit depth, as a fraction of the volume's typical retinal thickness, to call a frame foveal.
MIN_PIT_FRACTION = 0.15
_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]


def pad_to_square(image: np.ndarray, fill: np.ndarray | float) -> np.ndarray:
    """Centre `image` ([H,W] or [H,W,C]) on a square canvas filled with `fill`."""
    h, w = image.shape[:2]
    side = max(h, w)
    canvas = np.empty((side, side, *image.shape[2:]), dtype=image.dtype)
    canvas[...] = fill
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = image
    return canvas


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def _normalise(rgb_uint8: np.ndarray) -> np.ndarray:
    chw = rgb_uint8.astype(np.float32).transpose(2, 0, 1) / 255.0
    return (chw - _MEAN) / _STD


def preprocess_cfp(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [H,W,3] fundus photograph -> float32 [3,size,size] encoder input."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"CFP must be uint8 [H,W,3], got {image.dtype} {image.shape}")
    mean_colour = np.rint(image.reshape(-1, 3).mean(axis=0)).astype(np.uint8)
    return _normalise(_resize(pad_to_square(image, mean_colour), size))


def to_uint8(frame: np.ndarray) -> np.ndarray:
    """A B-scan as uint8: unchanged when already uint8, else its 0.5-99.5 percentile range stretched."""
    if frame.dtype == np.uint8:
        return frame
    low, high = np.percentile(frame, [0.5, 99.5])
    scaled = (frame.astype(np.float64) - low) / (high - low) if high > low else np.zeros(frame.shape)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def preprocess_oct(bscan: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """One B-scan [H,W] (any numeric dtype) -> float32 [3,size,size] encoder input."""
    if bscan.ndim != 2:
        raise ValueError(f"a B-scan must be [H,W], got shape {bscan.shape}")
    grey = to_uint8(bscan)
    background = np.uint8(np.median(np.concatenate([grey[:2].ravel(), grey[-2:].ravel()])))
    square = _resize(pad_to_square(grey, background), size)
    return _normalise(np.repeat(square[..., None], 3, axis=2))


def _box_smooth(data: np.ndarray, width: int, axis: int) -> np.ndarray:
    """Moving average along `axis` (edges replicated)."""
    if width <= 1:
        return data
    pad = [(0, 0)] * data.ndim
    pad[axis] = (width // 2, width - 1 - width // 2)
    padded = np.pad(data, pad, mode="edge")
    csum = np.cumsum(padded, axis=axis, dtype=np.float64)
    zero = np.zeros_like(np.take(csum, [0], axis=axis))
    csum = np.concatenate([zero, csum], axis=axis)
    upper = np.take(csum, np.arange(width, csum.shape[axis]), axis=axis)
    lower = np.take(csum, np.arange(0, csum.shape[axis] - width), axis=axis)
    return (upper - lower) / width


def _retina_boundaries(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per frame and column: first and last row of the bright retinal band (NaN where none)."""
    frames, rows, cols = volume.shape
    step = max(1, cols // 128)
    data = volume[:, :, : cols // step * step].astype(np.float32)
    data = data.reshape(frames, rows, -1, step).mean(axis=3)  # at most ~128 columns
    data = _box_smooth(data, max(3, rows // 64), axis=1)
    low = np.percentile(data, 50, axis=(1, 2), keepdims=True)
    high = np.percentile(data, 99, axis=(1, 2), keepdims=True)
    bright = data > low + 0.4 * (high - low)
    has = bright.any(axis=1)
    top = np.where(has, bright.argmax(axis=1), np.nan).astype(np.float64)
    bottom = np.where(has, rows - 1 - bright[:, ::-1].argmax(axis=1), np.nan).astype(np.float64)
    return top, bottom


def select_foveal_bscan(volume: np.ndarray) -> tuple[int, str]:
    """(0-based frame index, method) of the foveal B-scan of an OCT volume [frames, rows, cols].

    The fovea is where the inner retinal surface dips deepest below its level elsewhere in the frame
    (the foveal pit), looked for in the central 80 % of columns of every frame. Returns (index, "fovea")
    when the deepest pit is at least MIN_PIT_FRACTION of the typical retinal thickness, else the central
    frame with method "central" (flat or unreadable volumes, single frames).
    """
    if volume.ndim != 3 or volume.shape[0] == 0:
        raise ValueError(f"an OCT volume must be [frames, rows, cols], got shape {volume.shape}")
    frames = volume.shape[0]
    central = frames // 2
    if frames < 3:
        return central, "central"
    top, bottom = _retina_boundaries(volume)
    thickness = bottom - top
    if np.all(np.isnan(thickness)):
        return central, "central"
    typical = float(np.nanmedian(thickness))
    cols = top.shape[1]
    band = slice(cols // 10, cols - cols // 10)
    with np.errstate(all="ignore"):
        smooth_top = _box_smooth(np.nan_to_num(top, nan=np.nanmedian(top)), 3, axis=1)
        dip = smooth_top[:, band] - np.nanmedian(top, axis=1, keepdims=True)
    depth = np.max(dip, axis=1)
    depth = _box_smooth(depth[:, None], 3, axis=0)[:, 0] if frames >= 5 else depth
    readable = _coherent_frames(top, volume.shape[1])
    if readable.mean() < 0.5:  # noise, not a retina: no trustworthy pit
        return central, "central"
    depth = np.where(readable, depth, -np.inf)
    best = int(np.argmax(depth))
    if not typical > 0 or depth[best] < MIN_PIT_FRACTION * typical:
        return central, "central"
    return best, "fovea"


def foveal_pit(bscan: np.ndarray) -> tuple[float, float] | None:
    """(column, row) pixel coordinates of the foveal pit in one B-scan [rows, cols]: where the inner
    retinal surface dips deepest in the central 80 % of columns (as `select_foveal_bscan` judges frames).
    None when no retinal surface is found across most columns (no pit to point at)."""
    if bscan.ndim != 2 or min(bscan.shape) < 8:
        return None
    tops, bottoms = _retina_boundaries(bscan[None])
    if np.isnan(tops).mean() > 0.2 or not _coherent_frames(tops, bscan.shape[0])[0]:  # no retina, or speckle
        return None
    top = tops[0]
    step = max(1, bscan.shape[1] // 128)  # the column grouping _retina_boundaries used
    smooth = _box_smooth(np.nan_to_num(top, nan=float(np.nanmedian(top)))[None], 3, axis=1)[0]
    band = slice(len(top) // 10, len(top) - len(top) // 10)
    column = band.start + int(np.argmax(smooth[band]))
    typical = float(np.nanmedian(bottoms[0] - top))
    if not typical > 0 or smooth[column] - float(np.nanmedian(top)) < MIN_PIT_FRACTION * typical:
        return None  # a flat surface: no pit
    return (column + 0.5) * step, float(smooth[column]) + 0.5


def _coherent_frames(top: np.ndarray, rows: int) -> np.ndarray:
    """Frames whose inner surface is found in most columns and is smooth (a retina, not speckle):
    the median step between neighbouring columns is at most 1 % of the frame height (2 rows minimum)."""
    found = (~np.isnan(top)).mean(axis=1) >= 0.8
    with np.errstate(all="ignore"):
        jumps = np.nanmedian(np.abs(np.diff(top, axis=1)), axis=1)
    return found & (jumps <= max(2.0, 0.01 * rows))
