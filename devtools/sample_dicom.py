"""Small synthetic ophthalmic DICOM instances for the demo, tests and benchmarks (no patient data).

A colour fundus photograph as Ophthalmic Photography 8 Bit (JPEG baseline, as fundus cameras send it)
and an OCT volume as a multi-frame Ophthalmic Tomography Image (uncompressed or JPEG 2000). Pixel
content is a cheap synthetic pattern: these files exercise transport and storage, not the model.
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    generate_uid,
)

from grok_pacs.dicom.sop_classes import OP_8BIT, OPT

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


@dataclass
class Patient:
    """Patient and study attributes shared by every instance of one synthetic study (the demo's phantom
    by default)."""

    patient_id: str = "PHANTOM-0001"
    patient_name: str = PATIENT_NAME
    birth_date: str = ""
    sex: str = "O"
    study_uid: str = field(default_factory=generate_uid)
    accession: str = "GROKDEMO"
    study_id: str = "1"
    study_date: str = "20250101"
    study_time: str = "090000"


ACQUIRED = dt.datetime(2025, 1, 1, 9, 0, 0)


def base_dataset(
    patient: Patient,
    sop_class: str,
    modality: str,
    series_uid: str,
    acquired: dt.datetime = ACQUIRED,
    manufacturer: str = "grok-pacs synthetic",
) -> Dataset:
    """The attributes every synthetic OP/OPT instance carries: SOP, patient, study, series, equipment,
    acquisition date/time and an 8-bit unsigned pixel module; no pixels, laterality or file meta."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.PatientName, ds.PatientID = patient.patient_name, patient.patient_id
    ds.PatientBirthDate, ds.PatientSex = patient.birth_date, patient.sex
    ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = patient.study_uid, patient.study_id, patient.accession
    ds.StudyDate, ds.StudyTime = patient.study_date, patient.study_time
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = series_uid, modality, 1, 1
    ds.Manufacturer = manufacturer
    ds.AcquisitionDateTime = acquired.strftime("%Y%m%d%H%M%S")
    ds.ContentDate, ds.ContentTime = acquired.strftime("%Y%m%d"), acquired.strftime("%H%M%S")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    return ds


def with_file_meta(ds: Dataset, syntax: str) -> Dataset:
    """Give `ds` the file meta of a Part 10 file in transfer syntax `syntax` (built from its SOP UIDs)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def set_jpeg_frame(ds: Dataset, jpeg: bytes) -> Dataset:
    """Make `ds` carry one encapsulated JPEG baseline colour frame (YBR_FULL_422, lossy) and say so in its
    file meta; Rows and Columns are the caller's."""
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return with_file_meta(ds, JPEGBaseline8Bit)


def set_monochrome_frames(ds: Dataset, volume: np.ndarray) -> Dataset:
    """Make `ds` carry `volume` (uint8 [frames, rows, columns]) as uncompressed MONOCHROME2 frames."""
    ds.NumberOfFrames, ds.Rows, ds.Columns = volume.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.ascontiguousarray(volume, np.uint8).tobytes()
    ds["PixelData"].VR = "OB"
    return ds


def fundus_photograph(
    study_uid: str, laterality: str, size: int = 256, series_uid: str | None = None, quality: int = 90, seed: int = 0
) -> Dataset:
    """An OP 8 Bit instance with one JPEG-baseline (YBR_FULL_422 signalled as YBR_FULL) RGB frame."""
    ds = base_dataset(Patient(study_uid=study_uid), OP_8BIT, "OP", series_uid or generate_uid())
    ds.ImageLaterality = laterality
    ds.Rows = ds.Columns = size
    return set_jpeg_frame(ds, jpeg_bytes(fundus_rgb(size, laterality, seed), quality))


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


def oct_tomography(
    study_uid: str,
    laterality: str,
    frames: int = 16,
    rows: int = 128,
    columns: int = 128,
    syntax: str = ExplicitVRLittleEndian,
    series_uid: str | None = None,
    seed: int = 0,
) -> Dataset:
    """A multi-frame Ophthalmic Tomography Image (OPT), uncompressed or JPEG 2000 lossless."""
    ds = base_dataset(Patient(study_uid=study_uid), OPT, "OPT", series_uid or generate_uid())
    ds.ImageLaterality = laterality
    set_monochrome_frames(with_file_meta(ds, ExplicitVRLittleEndian), oct_volume_array(frames, rows, columns, seed))
    if syntax == JPEG2000Lossless:
        ds.compress(JPEG2000Lossless)
    elif syntax != ExplicitVRLittleEndian:
        raise ValueError(f"unsupported OPT transfer syntax {syntax}")
    return ds


def write(ds: Dataset, path: Path, syntax: str | None = None) -> Path:
    """Save `ds` as a DICOM Part 10 file at `path`, its file meta rebuilt from its SOP UIDs; transfer
    syntax `syntax`, else the one its file meta names, else explicit VR little endian."""
    current = getattr(ds, "file_meta", FileMetaDataset()).get("TransferSyntaxUID")
    with_file_meta(ds, syntax or current or ExplicitVRLittleEndian)
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
