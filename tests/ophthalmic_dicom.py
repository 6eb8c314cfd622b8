"""Real ophthalmic DICOM instances for the SR / worker / delivery tests (pydicom, written to files).

A CFP is an Ophthalmic Photography 8 Bit instance (Modality OP, RGB); an OCT is a multi-frame
Ophthalmic Tomography instance (Modality OPT, MONOCHROME2). Pixel content is a smooth synthetic
fundus / retina-like pattern, enough for the tiny model bundle to run on.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
OPT = "1.2.840.10008.5.1.4.1.1.77.1.5.4"


@dataclass
class Patient:
    """Patient and study attributes shared by every instance of one synthetic study."""

    patient_id: str = "GROK-TEST-001"
    patient_name: str = "Test^Retina"
    birth_date: str = "19600101"
    sex: str = "F"
    study_uid: str = field(default_factory=generate_uid)
    accession: str = "ACC0001"
    study_id: str = "S1"
    study_date: str = "20250101"
    study_time: str = "101500"


def _base(patient: Patient, sop_class: str, modality: str, series_uid: str, acquired: dt.datetime) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientID = patient.patient_id
    ds.PatientName = patient.patient_name
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = patient.study_uid
    ds.StudyDate = patient.study_date
    ds.StudyTime = patient.study_time
    ds.StudyID = patient.study_id
    ds.AccessionNumber = patient.accession
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.Manufacturer = "Synthetic Optics"
    ds.ManufacturerModelName = "Phantom 1"
    ds.SoftwareVersions = "1.0"
    ds.DeviceSerialNumber = "SN-1"
    ds.AcquisitionDateTime = acquired.strftime("%Y%m%d%H%M%S")
    ds.ContentDate = acquired.strftime("%Y%m%d")
    ds.ContentTime = acquired.strftime("%H%M%S")
    ds.PixelRepresentation = 0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    return ds


def fundus_pixels(size: int = 256, seed: int = 0) -> np.ndarray:
    """An RGB fundus-like image: orange disc of retina, bright optic disc, dark fovea."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    r = np.hypot(xx - 0.5, yy - 0.5)
    retina = (r < 0.48).astype(np.float32)
    disc = np.exp(-(((xx - 0.7) ** 2 + (yy - 0.5) ** 2) / 0.003))
    fovea = np.exp(-(((xx - 0.45) ** 2 + (yy - 0.5) ** 2) / 0.004))
    base = retina * (0.6 + 0.05 * rng.standard_normal((size, size)))
    rgb = np.stack([base * 0.9 + disc, base * 0.45 + 0.8 * disc - 0.2 * fovea, base * 0.15 + 0.5 * disc], -1)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def oct_pixels(frames: int = 8, rows: int = 64, cols: int = 96, seed: int = 0) -> np.ndarray:
    """B-scans with bright layered retina bands and a foveal pit in the central frame."""
    rng = np.random.default_rng(seed)
    out = np.zeros((frames, rows, cols), np.float32)
    x = np.arange(cols) / cols
    for f in range(frames):
        depth = 1.0 - abs(f - frames // 2) / max(frames // 2, 1)
        top = rows * 0.3 + rows * 0.12 * depth * np.exp(-((x - 0.5) ** 2) / 0.01)
        for c in range(cols):
            t = int(top[c])
            out[f, t : t + rows // 5, c] = 0.8
            out[f, t + rows // 5 : t + rows // 5 + 3, c] = 1.0
    out += 0.05 * rng.standard_normal(out.shape)
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def make_cfp(patient: Patient, laterality: str, *, acquired: dt.datetime | None = None,
             series_uid: str | None = None, use_image_laterality: bool = True, seed: int = 0) -> Dataset:
    """An Ophthalmic Photography 8 Bit instance of one eye."""
    acquired = acquired or dt.datetime(2025, 1, 1, 10, 0, 0)
    ds = _base(patient, OP_8BIT, "OP", series_uid or generate_uid(), acquired)
    pixels = fundus_pixels(seed=seed)
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if use_image_laterality:
        ds.ImageLaterality = laterality
    else:
        ds.Laterality = laterality
    ds.PixelData = pixels.tobytes()
    return ds


def make_oct(patient: Patient, laterality: str, *, acquired: dt.datetime | None = None,
             series_uid: str | None = None, frames: int = 8, seed: int = 0) -> Dataset:
    """A multi-frame Ophthalmic Tomography instance (B-scans) of one eye."""
    acquired = acquired or dt.datetime(2025, 1, 1, 10, 5, 0)
    ds = _base(patient, OPT, "OPT", series_uid or generate_uid(), acquired)
    pixels = oct_pixels(frames=frames, seed=seed)
    ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[1:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ImageLaterality = laterality
    ds.PixelData = pixels.tobytes()
    return ds


def make_undecodable_cfp(patient: Patient, laterality: str, **kwargs) -> Dataset:
    """A complete, well-formed OP instance whose JPEG pixel data cannot be decoded (a broken camera file).

    It passes the listener (which never decodes pixels) and fails only when the worker reads pixels.
    """
    ds = make_cfp(patient, laterality, **kwargs)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8])
    ds["PixelData"].VR = "OB"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PhotometricInterpretation = "YBR_FULL_422"
    return ds


def write(ds: Dataset, path: Path) -> Path:
    """Write `ds` as a DICOM Part 10 file (its own transfer syntax if set, else explicit VR little endian)."""
    syntax = getattr(ds, "file_meta", FileMetaDataset()).get("TransferSyntaxUID", ExplicitVRLittleEndian)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def hand_built_report(eye: str, datasets: list[Dataset], *, label: str = "Glaucoma",
                      bundle_version: str = "0.1.0"):
    """A `Report` written by hand (no model) for the given source datasets: every biomarker of the
    modalities present at its normal mid-range, a fixed narrative; for SR and delivery tests."""
    from grok_pacs.biomarkers import CFP_BIOMARKERS, OCT_BIOMARKERS
    from grok_pacs.labels import Label
    from grok_pacs.report import BiomarkerEstimate, Eye, Report, SourceImage

    has_cfp = any(ds.SOPClassUID == OP_8BIT for ds in datasets)
    has_oct = any(ds.SOPClassUID == OPT for ds in datasets)
    markers = (CFP_BIOMARKERS if has_cfp else ()) + (OCT_BIOMARKERS if has_oct else ())
    sources = tuple(SourceImage(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID),
                                4 if ds.SOPClassUID == OPT else None) for ds in datasets)
    return Report(
        eye=Eye(eye), label=Label(label),
        narrative="The optic disc shows a cup-to-disc ratio of 0.35; macular thickness is 255.0 um.",
        impression=f"Findings are consistent with {label}.", raw_text="(hand-built)",
        biomarkers=tuple(BiomarkerEstimate(b.key, sum(b.normal) / 2, b.unit) for b in markers),
        cited_numbers=(), label_scores={},
        missing_modalities=tuple(m for m, present in (("CFP", has_cfp), ("OCT", has_oct)) if not present),
        sources=sources, oct_frame_index=3 if has_oct else None, oct_frame_method="fovea" if has_oct else None,
        bundle_name="tiny", bundle_version=bundle_version)
