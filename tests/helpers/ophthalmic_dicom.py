"""Real ophthalmic DICOM instances for the SR / worker / delivery tests (pydicom, written to files).

A CFP is an Ophthalmic Photography 8 Bit instance (Modality OP, RGB); an OCT is a multi-frame
Ophthalmic Tomography instance (Modality OPT, MONOCHROME2). Pixel content is a smooth synthetic
fundus / retina-like pattern, enough for the tiny model bundle to run on.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from devtools import sample_dicom
from devtools.sample_dicom import set_jpeg_frame, set_monochrome_frames, write
from grok_pacs.dicom.sop_classes import OP_8BIT, OPT

__all__ = [
    "Patient",
    "fundus_pixels",
    "hand_built_report",
    "make_cfp",
    "make_oct",
    "make_undecodable_cfp",
    "oct_pixels",
    "write",
]


@dataclass
class Patient(sample_dicom.Patient):
    """The tests' patient: the runtime's synthetic patient/study record with the tests' own defaults."""

    patient_id: str = "GROK-TEST-001"
    patient_name: str = "Test^Retina"
    birth_date: str = "19600101"
    sex: str = "F"
    accession: str = "ACC0001"
    study_id: str = "S1"
    study_time: str = "101500"


def _base(patient: Patient, sop_class: str, modality: str, series_uid: str, acquired: dt.datetime) -> Dataset:
    """The runtime's base attributes, made by the tests' camera (its equipment and character set)."""
    ds = sample_dicom.base_dataset(patient, sop_class, modality, series_uid, acquired, "Synthetic Optics")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ManufacturerModelName, ds.SoftwareVersions, ds.DeviceSerialNumber = "Phantom 1", "1.0", "SN-1"
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


def make_cfp(
    patient: Patient,
    laterality: str,
    *,
    acquired: dt.datetime | None = None,
    series_uid: str | None = None,
    use_image_laterality: bool = True,
    seed: int = 0,
) -> Dataset:
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


def make_oct(
    patient: Patient,
    laterality: str,
    *,
    acquired: dt.datetime | None = None,
    series_uid: str | None = None,
    frames: int = 8,
    seed: int = 0,
    volume: np.ndarray | None = None,
) -> Dataset:
    """A multi-frame Ophthalmic Tomography instance (B-scans) of one eye: `volume` (uint8 [frames, rows,
    cols]) when given, else `frames` synthetic B-scans."""
    acquired = acquired or dt.datetime(2025, 1, 1, 10, 5, 0)
    ds = _base(patient, OPT, "OPT", series_uid or generate_uid(), acquired)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ImageLaterality = laterality
    return set_monochrome_frames(ds, oct_pixels(frames=frames, seed=seed) if volume is None else volume)


def make_undecodable_cfp(patient: Patient, laterality: str, **kwargs) -> Dataset:
    """A complete, well-formed OP instance whose JPEG pixel data cannot be decoded (a broken camera file).

    It passes the listener (which never decodes pixels) and fails only when the worker reads pixels.
    """
    return set_jpeg_frame(make_cfp(patient, laterality, **kwargs), b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)


def hand_built_report(eye: str, datasets: list[Dataset], *, label: str = "Glaucoma", bundle_version: str = "0.1.0"):
    """A `Report` written by hand (no model) for the given source datasets: every biomarker of the
    modalities present at its normal mid-range, a fixed narrative; for SR and delivery tests."""
    from grok_pacs.analysis.result import BiomarkerEstimate, Eye, Report, SourceImage
    from grok_pacs.domain.biomarkers import CFP_BIOMARKERS, OCT_BIOMARKERS
    from grok_pacs.domain.labels import Label

    has_cfp = any(ds.SOPClassUID == OP_8BIT for ds in datasets)
    has_oct = any(ds.SOPClassUID == OPT for ds in datasets)
    markers = (CFP_BIOMARKERS if has_cfp else ()) + (OCT_BIOMARKERS if has_oct else ())
    sources = tuple(
        SourceImage(
            str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), 4 if ds.SOPClassUID == OPT else None
        )
        for ds in datasets
    )
    return Report(
        eye=Eye(eye),
        label=Label(label),
        narrative="The optic disc shows a cup-to-disc ratio of 0.35; macular thickness is 255.0 um.",
        impression=f"Findings are consistent with {label}.",
        raw_text="(hand-built)",
        biomarkers=tuple(BiomarkerEstimate(b.key, sum(b.normal) / 2, b.unit) for b in markers),
        cited_numbers=(),
        label_scores={},
        missing_modalities=tuple(m for m, present in (("CFP", has_cfp), ("OCT", has_oct)) if not present),
        sources=sources,
        oct_frame_index=3 if has_oct else None,
        oct_frame_method="fovea" if has_oct else None,
        bundle_name="tiny",
        bundle_version=bundle_version,
    )
