"""The source images a result used, as PNG for the browser: a colour fundus photograph as it is, an OCT volume's
middle B-scan, each scaled to at most MAX_SIDE pixels and stretched to the full grey range where it is not RGB.

Read from the listener's stored copy of the instance (the index's path under the data directory); an
instance purged by retention, or only in the object store, is "not available" (ImageUnavailable).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from grok_pacs.dicom.uids import resolve_inside
from grok_pacs.store.index import StudyIndex

MAX_SIDE = 768


class ImageUnavailable(LookupError):
    """The instance is not (or no longer) stored here, or its pixels cannot be decoded."""


def instance_path(index: StudyIndex, data_dir: Path, study_uid: str, sop_uid: str) -> Path:
    for record in index.instances(study_uid):
        if record.sop_uid == sop_uid:
            path = resolve_inside(Path(data_dir), record.path)
            if path.is_file():
                return path
            break
    raise ImageUnavailable(f"instance {sop_uid} of study {study_uid} is not stored here")


def render_png(path: Path) -> bytes:
    """The instance's image (an OCT's middle frame) as PNG bytes."""
    try:
        ds = pydicom.dcmread(path)
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the same to the page: no image
        raise ImageUnavailable(f"{path.name}: pixels cannot be decoded ({type(exc).__name__})") from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[frames // 2]
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        image = Image.fromarray(_to_uint8(pixels, per_channel=False), "RGB")
    else:
        image = Image.fromarray(_to_uint8(pixels.squeeze(), per_channel=True), "L")
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _to_uint8(pixels: np.ndarray, *, per_channel: bool) -> np.ndarray:
    if pixels.dtype == np.uint8 and not per_channel:
        return pixels
    values = pixels.astype(np.float32)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return ((values - low) * (255.0 / (high - low))).astype(np.uint8)
