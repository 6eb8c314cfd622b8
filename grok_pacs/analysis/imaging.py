"""Reading pixels: a CFP as uint8 RGB, an OCT volume as [frames, rows, cols].

DICOM through pydicom (JPEG baseline and JPEG 2000 decoded by pylibjpeg), or ordinary image files (a CFP
PNG/JPEG; an OCT as a folder of B-scan images in natural order). Errors name the file and what is wrong.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import generate_frames

from grok_pacs.analysis.result import Eye, SourceImage
from grok_pacs.ops.phi import describe

_STRICT_JPEG_SYNTAXES = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")  #: JPEG baseline, extended
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class ImageReadError(ValueError):
    """Pixels that cannot be read or are not what the modality needs; names the file."""


class CorruptFrameError(ValueError):
    """A compressed frame that does not decode strictly (our message: kept in study details and logs)."""


def is_dicom(path: Path) -> bool:
    """True for a Part-10 file (DICM at offset 128) or a .dcm file."""
    if path.suffix.lower() == ".dcm":
        return True
    with path.open("rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def verify_jpeg(ds: pydicom.Dataset) -> None:
    """Decode each JPEG baseline/extended frame strictly (libjpeg-turbo via Pillow); CorruptFrameError when corrupt.

    pydicom's decoder silently fills whatever follows corrupted entropy-coded data; a fill is not an image.
    """
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if syntax not in _STRICT_JPEG_SYNTAXES or "PixelData" not in ds:
        return
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    for number, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames), 1):
        try:
            with Image.open(io.BytesIO(frame)) as img:
                img.load()
        except (OSError, SyntaxError) as exc:
            raise CorruptFrameError(f"JPEG frame {number} is corrupt ({type(exc).__name__})") from exc


def _dicom_pixels(path: Path) -> tuple[np.ndarray, pydicom.Dataset]:
    try:
        ds = pydicom.dcmread(path)
        verify_jpeg(ds)
        pixels = ds.pixel_array  # pydicom 3 converts YBR to RGB by default
    except Exception as exc:  # pydicom raises several types for unreadable / undecodable pixel data
        raise ImageReadError(f"{path}: cannot decode DICOM pixel data: {describe(exc)}") from exc
    return np.asarray(pixels), ds


def _to_uint8(pixels: np.ndarray, bits_stored: int | None = None) -> np.ndarray:
    """Scale integer/float pixels to uint8 (by bits stored when known, else by the value range)."""
    if pixels.dtype == np.uint8:
        return pixels
    data = pixels.astype(np.float64)
    if bits_stored and np.issubdtype(pixels.dtype, np.unsignedinteger):
        scaled = data / float(2**bits_stored - 1)
    else:
        low, high = float(data.min()), float(data.max())
        scaled = (data - low) / (high - low) if high > low else np.zeros_like(data)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def read_cfp(path: str | Path) -> np.ndarray:
    """A colour fundus photograph as uint8 [H, W, 3] RGB (grey images are replicated to 3 channels)."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"CFP file {path} does not exist")
    if is_dicom(path):
        pixels, ds = _dicom_pixels(path)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if frames > 1:
            pixels = pixels[0]
        pixels = _to_uint8(pixels, getattr(ds, "BitsStored", None))
    else:
        try:
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("RGB"))
        except OSError as exc:
            raise ImageReadError(f"{path}: not a readable image: {describe(exc)}") from exc
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ImageReadError(f"{path}: expected an RGB or grey image, got shape {pixels.shape}")
    return np.ascontiguousarray(pixels)


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def read_oct_volume(path: str | Path) -> np.ndarray:
    """An OCT volume [frames, rows, cols]: uint8 for 8-bit sources, float32 otherwise; colour is averaged to grey.

    `path` is a (multi-frame) DICOM file, or a folder of B-scan images read in natural filename order.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
        if not files:
            raise ImageReadError(f"OCT folder {path} holds no B-scan images ({', '.join(IMAGE_SUFFIXES)})")
        frames = []
        for file in files:
            with Image.open(file) as img:
                frames.append(np.asarray(img.convert("L")))
        if len({f.shape for f in frames}) != 1:
            raise ImageReadError(f"OCT folder {path}: B-scans differ in size")
        return np.stack(frames)
    if not path.is_file():
        raise ImageReadError(f"OCT file {path} does not exist")
    pixels, ds = _dicom_pixels(path)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if frames == 1:
        pixels = pixels[None]
    if samples > 1:
        pixels = pixels.mean(axis=-1)
    if pixels.ndim != 3:
        raise ImageReadError(f"{path}: expected [frames, rows, cols], got shape {pixels.shape}")
    return pixels if pixels.dtype == np.uint8 else pixels.astype(np.float32)


@dataclass(frozen=True)
class EyeImages:
    """One eye's pixels for `Engine.analyze_batch`: uint8 [H,W,3] CFP and/or [F,H,W] OCT volume."""

    eye: Eye
    cfp_image: np.ndarray | None = None
    oct_volume: np.ndarray | None = None
    sources: tuple[SourceImage, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)  #: e.g. {"read": seconds} measured by the caller

    def __post_init__(self) -> None:
        object.__setattr__(self, "eye", Eye(self.eye))
        if self.cfp_image is None and self.oct_volume is None:
            raise ValueError(f"analyze needs a CFP or an OCT for eye {self.eye.value}; both are missing")
