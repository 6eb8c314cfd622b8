"""Small synthetic ophthalmic DICOM instances for the demo, tests and benchmarks (no patient data).

A colour fundus photograph as Ophthalmic Photography 8 Bit (JPEG baseline, as fundus cameras send it)
and an OCT volume as a multi-frame Ophthalmic Tomography Image (uncompressed or JPEG 2000). Pixel
content is a cheap synthetic pattern: these files exercise transport and storage, not the model.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    ExplicitVRLittleEndian,
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)

from grok_pacs.config import OP_8BIT, OPT

PATIENT_NAME = "PHANTOM^DEMO"  # synthetic; never a real person


def fundus_rgb(size: int, laterality: str, seed: int = 0) -> np.ndarray:
    """A fundus-like RGB image: orange disc of retina, bright optic disc, dark vessels, some noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    retina = (xx**2 + yy**2) < 0.22
    disc_x = 0.18 if laterality == "R" else -0.18
    disc = ((xx - disc_x) ** 2 + yy**2) < 0.004
    vessels = np.abs(np.sin(12 * np.arctan2(yy, xx - disc_x))) < 0.08
    image = np.zeros((size, size, 3), np.float32)
    image[retina] = (200, 90, 40)
    image[retina & vessels] = (120, 30, 20)
    image[disc] = (250, 220, 160)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def _base(sop_class: str, modality: str, study_uid: str, series_uid: str, laterality: str,
          syntax: str) -> Dataset:
    ds = Dataset()
    meta = FileMetaDataset()
    ds.SOPInstanceUID = generate_uid()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = PATIENT_NAME, "PHANTOM-0001", "", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20250101", "090000", "GROKDEMO", "1"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, 1
    ds.ImageLaterality = laterality
    ds.AcquisitionDateTime = "20250101090000"
    ds.ContentDate, ds.ContentTime = "20250101", "090000"
    ds.Manufacturer = "grok-pacs synthetic"
    return ds


def fundus_photograph(study_uid: str, laterality: str, size: int = 256, series_uid: str | None = None,
                      quality: int = 90, seed: int = 0) -> Dataset:
    """An OP 8 Bit instance with one JPEG-baseline (YBR_FULL_422 signalled as YBR_FULL) RGB frame."""
    ds = _base(OP_8BIT, "OP", study_uid, series_uid or generate_uid(), laterality, JPEGBaseline8Bit)
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds.PixelData = encapsulate([jpeg_bytes(fundus_rgb(size, laterality, seed), quality)])
    ds["PixelData"].VR = "OB"
    return ds


def oct_volume_array(frames: int, rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """B-scans with bright layered bands (retina) over speckle, one fovea dip in the middle frame."""
    rng = np.random.default_rng(seed)
    depth = np.arange(rows, dtype=np.float32)[:, None]
    x = np.linspace(-1, 1, columns, dtype=np.float32)[None, :]
    volume = np.empty((frames, rows, columns), np.uint8)
    for index in range(frames):
        dip = 0.08 * rows * np.exp(-(x**2) / 0.02) * np.exp(-((index - frames / 2) ** 2) / max(frames, 1))
        top = 0.35 * rows + dip
        bands = 160 * np.exp(-((depth - top) ** 2) / 40) + 120 * np.exp(-((depth - top - 0.2 * rows) ** 2) / 60)
        volume[index] = np.clip(bands + rng.integers(0, 40, (rows, columns)), 0, 255).astype(np.uint8)
    return volume


def oct_tomography(study_uid: str, laterality: str, frames: int = 16, rows: int = 128, columns: int = 128,
                   syntax: str = ExplicitVRLittleEndian, series_uid: str | None = None,
                   seed: int = 0) -> Dataset:
    """A multi-frame Ophthalmic Tomography Image (OPT), uncompressed or JPEG 2000 lossless."""
    ds = _base(OPT, "OPT", study_uid, series_uid or generate_uid(), laterality, ExplicitVRLittleEndian)
    ds.NumberOfFrames, ds.Rows, ds.Columns = frames, rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = oct_volume_array(frames, rows, columns, seed).tobytes()
    ds["PixelData"].VR = "OB"
    if syntax == JPEG2000Lossless:
        ds.compress(JPEG2000Lossless)
    elif syntax != ExplicitVRLittleEndian:
        raise ValueError(f"unsupported OPT transfer syntax {syntax}")
    return ds


def write(ds: Dataset, path: Path) -> Path:
    """Save `ds` as a DICOM file (with file meta) at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def demo_study(directory: Path, study_uid: str | None = None) -> list[Path]:
    """One CFP (OP, JPEG baseline) and one OCT (OPT, 16 frames) per eye, written to `directory`."""
    study_uid = study_uid or generate_uid()
    paths = []
    for number, eye in enumerate(("R", "L")):
        paths.append(write(fundus_photograph(study_uid, eye, seed=number), directory / f"cfp_{eye}.dcm"))
        paths.append(write(oct_tomography(study_uid, eye, seed=number), directory / f"oct_{eye}.dcm"))
    return paths
