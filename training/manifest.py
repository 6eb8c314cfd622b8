"""The cohort manifest: one CSV row per eye, the ML team's data contract (docs/cohort-manifest.md).

`load_manifest` checks every row and reports every problem with its row number at once (missing file,
unknown label, value out of the plausible range, duplicate subject/eye, ...), so a broken cohort is fixed
in one pass instead of one crash at a time. It refuses a broken manifest unless `drop_bad=True`, which
keeps the good rows and logs how many were dropped. `write_manifest` writes the same format.

Row numbers are the CSV's line numbers: the header is row 1, the first eye is row 2.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from grok_pacs.domain.biomarkers import BIOMARKERS, BY_KEY, format_value
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label

log = logging.getLogger(__name__)

EYES = ("R", "L")
SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("subject_id", "eye", "label", "split", "cfp_path", "oct_path")
OPTIONAL_COLUMNS = ("fovea_frame", "study_dir")
BIOMARKER_COLUMNS = tuple(b.key for b in BIOMARKERS)
MANIFEST_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS + BIOMARKER_COLUMNS
EXTRA_COLUMN_PREFIX = "meta_"  #: free extra columns (age, site, ...) must start with this
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm")
NAN_TEXTS = ("", "nan", "na", "n/a", "null", "none")
MANIFEST_NAME = "manifest.csv"


@dataclass(frozen=True)
class CohortRecord:
    subject_id: str
    eye: str  #: "R" or "L"
    label: Label  #: one of DIAGNOSTIC_LABELS
    split: str  #: "train", "val" or "test"
    cfp_path: Path  #: absolute: PNG/JPEG or DICOM (OP)
    oct_path: Path  #: absolute: multi-frame DICOM (OPT) or a folder of B-scan images
    biomarkers: dict[str, float]  #: all 37 keys in BIOMARKERS order; NaN where missing
    fovea_frame: int | None  #: 0-based index of the foveal B-scan, when known
    study_dir: Path | None  #: the subject's DICOM study folder, when there is one
    row: int  #: line of the manifest (header = 1); 0 for records not read from a file
    meta: dict[str, str] = field(default_factory=dict)  #: the row's extra `meta_*` columns (name without prefix)


@dataclass(frozen=True)
class Problem:
    row: int
    column: str
    message: str

    def __str__(self) -> str:
        where = f"row {self.row}" + (f", {self.column}" if self.column else "")
        return f"{where}: {self.message}"


@dataclass
class ManifestError(Exception):
    """Every problem of a manifest, each with its row number."""

    path: Path
    problems: list[Problem] = field(default_factory=list)

    def __str__(self) -> str:
        lines = "\n".join(f"  {p}" for p in self.problems)
        return f"{self.path}: {len(self.problems)} problem(s):\n{lines}"


def load_manifest(path: Path | str, *, drop_bad: bool = False) -> list[CohortRecord]:
    """Read and check a manifest; raise ManifestError listing every problem (or drop bad rows)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, [Problem(0, "", f"manifest file not found: {path}")])
    base = path.parent.resolve()
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header_problems = _check_header(reader.fieldnames or [])
        if header_problems:
            raise ManifestError(path, header_problems)
        rows = [(reader.line_num, row) for row in reader]
    records: list[CohortRecord] = []
    problems: list[Problem] = []
    seen: dict[tuple[str, str], int] = {}
    for row_no, row in rows:
        record, row_problems = _parse_row(row_no, row, base)
        key = (row.get("subject_id", "").strip(), row.get("eye", "").strip().upper())
        if key in seen:
            row_problems.append(
                Problem(row_no, "subject_id", f"duplicate subject/eye {key[0]}/{key[1]} (first at row {seen[key]})")
            )
        else:
            seen[key] = row_no
        problems.extend(row_problems)
        if record is not None and not row_problems:
            records.append(record)
    if not rows:
        raise ManifestError(path, [Problem(1, "", "manifest has a header but no rows")])
    if problems and not drop_bad:
        raise ManifestError(path, problems)
    if problems:
        bad_rows = sorted({p.row for p in problems})
        log.warning("%s: dropped %d bad row(s) of %d: rows %s", path, len(bad_rows), len(rows), bad_rows)
        if not records:
            raise ManifestError(path, problems + [Problem(0, "", "no usable rows left after dropping bad rows")])
    return records


def _check_header(columns: Sequence[str]) -> list[Problem]:
    problems = [Problem(1, c, "required column missing") for c in REQUIRED_COLUMNS if c not in columns]
    known = set(MANIFEST_COLUMNS)
    for column in columns:
        if column not in known and not column.startswith(EXTRA_COLUMN_PREFIX):
            problems.append(
                Problem(
                    1,
                    column,
                    f"unknown column (not a biomarker key; extra columns must start with {EXTRA_COLUMN_PREFIX!r})",
                )
            )
    duplicates = {c for c in columns if list(columns).count(c) > 1}
    problems.extend(Problem(1, c, "column appears more than once") for c in sorted(duplicates))
    return problems


def _parse_row(row_no: int, row: dict[str, str], base: Path) -> tuple[CohortRecord | None, list[Problem]]:
    problems: list[Problem] = []

    def bad(column: str, message: str) -> None:
        problems.append(Problem(row_no, column, message))

    subject = (row.get("subject_id") or "").strip()
    if not subject:
        bad("subject_id", "empty subject_id")
    eye = (row.get("eye") or "").strip().upper()
    if eye not in EYES:
        bad("eye", f"eye must be R or L, got {row.get('eye')!r}")
    label = _parse_label(row.get("label") or "", bad)
    split = (row.get("split") or "").strip().lower()
    if split not in SPLITS:
        bad("split", f"split must be one of {', '.join(SPLITS)}, got {row.get('split')!r}")
    cfp = _existing_path(row.get("cfp_path") or "", base, "cfp_path", bad, folder_ok=False)
    oct_path = _existing_path(row.get("oct_path") or "", base, "oct_path", bad, folder_ok=True)
    study_text = (row.get("study_dir") or "").strip()
    study = _existing_path(study_text, base, "study_dir", bad, folder_ok=True, file_ok=False) if study_text else None
    fovea = _parse_fovea(row.get("fovea_frame") or "", oct_path, bad)
    values = {key: _parse_value(key, row.get(key), bad) for key in BIOMARKER_COLUMNS}
    if problems or label is None or cfp is None or oct_path is None:
        return None, problems
    meta = {k[len(EXTRA_COLUMN_PREFIX) :]: v for k, v in row.items() if k and k.startswith(EXTRA_COLUMN_PREFIX)}
    return CohortRecord(subject, eye, label, split, cfp, oct_path, values, fovea, study, row_no, meta), problems


def _parse_label(text: str, bad) -> Label | None:
    try:
        label = Label(text.strip())
    except ValueError:
        label = None
    if label not in DIAGNOSTIC_LABELS:
        valid = ", ".join(lab.value for lab in DIAGNOSTIC_LABELS)
        bad("label", f"unknown label {text!r}; valid labels: {valid}")
        return None
    return label


def _existing_path(text: str, base: Path, column: str, bad, *, folder_ok: bool, file_ok: bool = True) -> Path | None:
    text = text.strip()
    if not text:
        bad(column, "empty path")
        return None
    path = Path(text) if os.path.isabs(text) else base / text
    if path.is_file() and file_ok:
        return path
    if path.is_dir() and folder_ok:
        if column == "oct_path" and not bscan_files(path):
            bad(column, f"folder has no B-scan images ({', '.join(IMAGE_SUFFIXES)}): {path}")
            return None
        return path
    kind = "folder" if not file_ok else ("file or folder" if folder_ok else "file")
    bad(column, f"{kind} not found: {path}")
    return None


def bscan_files(folder: Path) -> list[Path]:
    """The B-scan images of an OCT folder in natural file-name order (frame 2 before frame 10)."""

    def natural(p: Path) -> list:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", p.name)]

    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), key=natural)


def oct_frame_count(oct_path: Path) -> int:
    """Number of B-scans: images in a folder, or NumberOfFrames of a DICOM file (header only)."""
    if oct_path.is_dir():
        return len(bscan_files(oct_path))
    ds = pydicom.dcmread(oct_path, stop_before_pixels=True, specific_tags=["NumberOfFrames"])
    return int(ds.get("NumberOfFrames", 1) or 1)


def _parse_fovea(text: str, oct_path: Path | None, bad) -> int | None:
    text = text.strip()
    if not text or text.lower() in NAN_TEXTS:
        return None
    try:
        frame = int(text)
    except ValueError:
        bad("fovea_frame", f"fovea_frame must be a whole number (0-based frame index), got {text!r}")
        return None
    if frame < 0:
        bad("fovea_frame", f"fovea_frame must be >= 0, got {frame}")
        return None
    if oct_path is not None:
        try:
            count = oct_frame_count(oct_path)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            bad("oct_path", f"cannot read the OCT's frame count from {oct_path}: {exc}")
            return None
        if frame >= count:
            bad("fovea_frame", f"fovea_frame {frame} is past the OCT's last frame ({count} frames)")
            return None
    return frame


def _parse_value(key: str, text: str | None, bad) -> float:
    text = (text or "").strip()
    if text.lower() in NAN_TEXTS:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        bad(key, f"not a number: {text!r}")
        return math.nan
    if math.isnan(value):
        return math.nan
    low, high = BY_KEY[key].plausible
    if not low <= value <= high:
        unit = BY_KEY[key].unit
        bad(key, f"value {text} out of the plausible range {low:g}-{high:g} [{unit}]")
    return value


def write_manifest(path: Path | str, records: Iterable[CohortRecord]) -> Path:
    """Write records as a manifest; paths inside the manifest's folder are written relative to it."""
    path = Path(path)
    base = path.parent.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    records = list(records)
    meta_keys = sorted({k for r in records for k in r.meta})
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([*MANIFEST_COLUMNS, *(EXTRA_COLUMN_PREFIX + k for k in meta_keys)])
        for r in records:
            values = [
                "" if math.isnan(r.biomarkers.get(k, math.nan)) else format_value(BY_KEY[k], r.biomarkers[k])
                for k in BIOMARKER_COLUMNS
            ]
            writer.writerow(
                [
                    r.subject_id,
                    r.eye,
                    r.label.value,
                    r.split,
                    _relative(r.cfp_path, base),
                    _relative(r.oct_path, base),
                    "" if r.fovea_frame is None else r.fovea_frame,
                    "" if r.study_dir is None else _relative(r.study_dir, base),
                    *values,
                    *(r.meta.get(k, "") for k in meta_keys),
                ]
            )
    return path


def _relative(path: Path, base: Path) -> str:
    resolved = path.resolve()
    try:
        return resolved.relative_to(base).as_posix()
    except ValueError:
        return str(resolved)
