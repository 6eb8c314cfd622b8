"""Every file of a PACS export, read header-only and classified: a usable CFP/OCT instance, or why not.

Headers are read with pydicom `stop_before_pixels` after the listener's own completeness check
(`grok_pacs.dicom.header.read_header`, which walks past pixel data without loading it): pixel data is
never decoded here, and a truncated file is refused as the listener would refuse it. Patient identity stays in memory
(`Instance.patient_id`) and is turned into a pseudonym before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from grok_pacs.dicom.header import IncompleteDatasetError, read_header
from grok_pacs.dicom.sop_classes import OCT_BSCAN_VOLUME_ANALYSIS, OP_8BIT, OP_16BIT, OPT
from grok_pacs.dicom.uids import InvalidUIDError
from training.cohort.report import Unused

CFP_CLASSES = {OP_8BIT: "Ophthalmic Photography 8 Bit", OP_16BIT: "Ophthalmic Photography 16 Bit"}
OCT_CLASSES = {OPT: "Ophthalmic Tomography", OCT_BSCAN_VOLUME_ANALYSIS: "OCT B-scan Volume Analysis"}
#: Where a visit's day is read, first found wins (the acquisition is the visit; the study date is a fallback).
DATE_SOURCES = ("AcquisitionDate", "AcquisitionDateTime", "ContentDate", "SeriesDate", "StudyDate")
EYE_CODES = {"R": "R", "L": "L"}


@dataclass(frozen=True)
class Instance:
    """One usable image instance of the export (identity in memory only)."""

    path: Path  #: absolute
    rel: str  #: path inside the export (what reports name)
    patient_id: str
    kind: str  #: "CFP" or "OCT"
    eye: str  #: "R" or "L"
    day: date
    sop_uid: str
    series_uid: str
    frames: int
    site: str  #: InstitutionName ("" when absent)
    device: str  #: Manufacturer and model ("" when absent)


def export_files(root: Path) -> Iterator[Path]:
    """Every regular file under the export, in path order (hidden files included: nothing is skipped)."""
    yield from sorted(p for p in root.rglob("*") if p.is_file())


def scan_export(root: Path) -> tuple[list[Instance], list[Unused]]:
    """Classify every file: usable instances, and an Unused entry for every other file."""
    root = root.resolve()
    instances: list[Instance] = []
    unused: list[Unused] = []
    for path in export_files(root):
        found = classify(path, root)
        (instances if isinstance(found, Instance) else unused).append(found)
    return instances, unused


def classify(path: Path, root: Path) -> Instance | Unused:
    rel = path.relative_to(root).as_posix()

    def refuse(reason: str, detail: str) -> Unused:
        return Unused("export", rel, reason, detail)

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken files: each is reported
        return refuse("unreadable", f"not a readable DICOM file ({type(exc).__name__}: {str(exc)[:120]})")
    sop_class = str(ds.get("SOPClassUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    if sop_class in CFP_CLASSES:
        kind = "CFP"
    elif sop_class in OCT_CLASSES:
        kind = "OCT"
    else:
        modality = str(ds.get("Modality", "") or "?")
        return refuse("refused SOP class", f"SOP class {sop_class or 'missing'} (modality {modality}): not OP or OPT")
    try:
        read_header(path)  # the listener's check: a file that ends before its pixel data does is refused
    except (IncompleteDatasetError, InvalidUIDError) as exc:
        return refuse("unreadable", f"incomplete {kind} instance ({exc})")
    patient = str(ds.get("PatientID", "") or "").strip()
    if not patient:
        return refuse("no patient ID", "PatientID is empty: cannot be grouped with its other images or labels")
    eye = laterality(ds)
    if eye is None:
        return refuse("no laterality", f"{kind} without ImageLaterality, Laterality or FrameLaterality R/L")
    day = visit_day(ds)
    if day is None:
        return refuse("no date", f"{kind} without any of {', '.join(DATE_SOURCES)}")
    return Instance(
        path,
        rel,
        patient,
        kind,
        eye,
        day,
        str(ds.get("SOPInstanceUID", "")),
        str(ds.get("SeriesInstanceUID", "")),
        int(ds.get("NumberOfFrames", 1) or 1),
        str(ds.get("InstitutionName", "") or "").strip(),
        " ".join(str(ds.get(k, "") or "").strip() for k in ("Manufacturer", "ManufacturerModelName")).strip(),
    )


def laterality(ds: Dataset) -> str | None:
    """R or L from ImageLaterality, Laterality, or the shared functional groups' FrameLaterality."""
    values = [ds.get("ImageLaterality"), ds.get("Laterality")]
    for group in ds.get("SharedFunctionalGroupsSequence", None) or []:
        for anatomy in group.get("FrameAnatomySequence", None) or []:
            values.append(anatomy.get("FrameLaterality"))
    for value in values:
        code = EYE_CODES.get(str(value or "").strip().upper())
        if code:
            return code
    return None


def visit_day(ds: Dataset) -> date | None:
    for keyword in DATE_SOURCES:
        text = str(ds.get(keyword, "") or "").strip()[:8]
        try:
            return datetime.strptime(text, "%Y%m%d").date()
        except ValueError:
            continue  # absent or malformed here: try the next source
    return None
