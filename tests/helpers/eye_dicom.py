"""Synthetic eye images for model tests: OCT volumes with a foveal pit at a chosen frame/column, and real
DICOM files (JPEG-baseline Ophthalmic Photography, multi-frame Ophthalmic Tomography) built with pydicom.

Headers come from tests/helpers/ophthalmic_dicom.py; JPEG encoding, encapsulation and file writing are the runtime's
(devtools.sample_dicom): the CFP is one JPEG baseline frame, the transfer syntax fundus cameras really send.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom

from devtools.sample_dicom import jpeg_bytes, set_jpeg_frame, write
from grok_pacs.analysis.engine import EyeInput
from grok_pacs.analysis.result import Eye, SourceImage
from tests.helpers.ophthalmic_dicom import Patient, fundus_pixels, make_cfp, make_oct


def oct_volume(
    frames: int = 15,
    rows: int = 96,
    cols: int = 128,
    *,
    pit_frame: int | None = None,
    pit_col: float = 0.5,
    pit_depth: float = 0.2,
    noise: float = 10.0,
    seed: int = 0,
) -> np.ndarray:
    """uint8 [frames, rows, cols]: a bright retinal band over a dark background, with a Gaussian foveal
    pit centred at (pit_frame, pit_col * cols) whose depth is pit_depth * rows (no pit when pit_frame is None)."""
    rng = np.random.default_rng(seed)
    f = np.arange(frames)[:, None]
    c = np.arange(cols)[None, :]
    ilm = np.full((frames, cols), rows * 0.3)
    if pit_frame is not None:
        spread_c, spread_f = cols * 0.08, max(frames * 0.08, 1.0)
        ilm = ilm + pit_depth * rows * np.exp(
            -((c - pit_col * cols) ** 2 / (2 * spread_c**2) + (f - pit_frame) ** 2 / (2 * spread_f**2))
        )
    r = np.arange(rows)[None, :, None]
    rpe = rows * 0.7
    volume = rng.normal(20.0, noise, (frames, rows, cols))
    volume += ((r >= ilm[:, None, :]) & (r <= rpe)) * 120.0
    volume += ((r > rpe - 3) & (r <= rpe)) * 80.0
    return np.clip(volume, 0, 255).astype(np.uint8)


def write_jpeg_cfp(path: Path, patient: Patient, laterality: str, pixels: np.ndarray | None = None) -> Path:
    """An OP 8-bit instance whose pixels are one JPEG baseline frame (YBR_FULL_422)."""
    ds = make_cfp(patient, laterality)
    rgb = fundus_pixels() if pixels is None else pixels
    ds.Rows, ds.Columns = rgb.shape[:2]
    return write(set_jpeg_frame(ds, jpeg_bytes(rgb, quality=92)), path)


def write_oct(path: Path, patient: Patient, laterality: str, volume: np.ndarray) -> Path:
    """A multi-frame OPT instance holding `volume` (uncompressed MONOCHROME2)."""
    return write(make_oct(patient, laterality, volume=volume), path)


class StudyEye(NamedTuple):
    """One eye of `two_eye_study`: the engine's input, the datasets written, the patient, the OCT pit's frame."""

    item: EyeInput
    datasets: list[pydicom.Dataset]
    patient: Patient
    pit: int


def two_eye_study(root: Path) -> dict[Eye, StudyEye]:
    """Both eyes of one patient (JPEG CFP + 11-frame OCT each); the OCT pits sit at known, non-central frames."""
    patient, eyes = Patient(), {}
    for eye, pit in ((Eye.RIGHT, 3), (Eye.LEFT, 8)):
        cfp = write_jpeg_cfp(root / f"{eye.value}_cfp.dcm", patient, eye.value)
        oct_path = write_oct(
            root / f"{eye.value}_oct.dcm",
            patient,
            eye.value,
            oct_volume(frames=11, pit_frame=pit, pit_col=0.4, seed=pit),
        )
        datasets = [pydicom.dcmread(cfp), pydicom.dcmread(oct_path)]
        sources = tuple(SourceImage(ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID) for ds in datasets)
        eyes[eye] = StudyEye(EyeInput(eye, cfp, oct_path, sources), datasets, patient, pit)
    return eyes
