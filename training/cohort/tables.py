"""The labels and measurements CSVs of an export, keyed by the export's PatientID and (optionally) the eye.

labels.csv: `patient_id,eye,label` (eye R/L/OD/OS, empty = both eyes; an eye row wins over a both-eyes
row). measurements.csv: `patient_id,eye,<biomarker key>...` (eye required; empty cells = not measured).
A header problem (a required column missing, an unknown column) refuses the file: a misspelt biomarker
key must not silently become "missing". A bad row or value is reported and left out.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from grok_pacs.domain.biomarkers import BIOMARKERS, BY_KEY
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS
from training.cohort.report import Unused

EYE_WORDS = {"R": "R", "OD": "R", "RIGHT": "R", "L": "L", "OS": "L", "LEFT": "L"}
BOTH_EYES = ("", "B", "BOTH", "OU")
NAN_TEXTS = ("", "nan", "na", "n/a", "null", "none")
_LABELS = {lab.value.lower(): lab for lab in DIAGNOSTIC_LABELS}


class TableError(ValueError):
    """A labels or measurements file that cannot be used at all (missing, bad header)."""


@dataclass
class Keyed:
    """Rows by (patient_id, eye); eye "" = both eyes. `rows` remembers each key's CSV line for reports."""

    values: dict[tuple[str, str], object] = field(default_factory=dict)
    rows: dict[tuple[str, str], int] = field(default_factory=dict)

    def lookup(self, patient: str, eye: str) -> tuple[tuple[str, str], object] | None:
        for key in ((patient, eye), (patient, "")):
            if key in self.values:
                return key, self.values[key]
        return None


def _rows(path: Path, required: tuple[str, ...], allowed: set[str]) -> list[tuple[int, dict[str, str]]]:
    if not path.is_file():
        raise TableError(f"{path}: file not found")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in required if c not in columns]
        unknown = [c for c in columns if c not in allowed]
        if missing or unknown:
            raise TableError(
                f"{path}: missing column(s) {missing}, unknown column(s) {unknown}; allowed: {sorted(allowed)}"
            )
        return [(reader.line_num, {k.strip(): (v or "").strip() for k, v in row.items() if k}) for row in reader]


def _key(
    source: str, row_no: int, row: dict[str, str], eye_required: bool
) -> tuple[tuple[str, str] | None, Unused | None]:
    patient = row.get("patient_id", "")
    if not patient:
        return None, Unused(source, f"row {row_no}", "bad row", "empty patient_id")
    text = row.get("eye", "").upper()
    if text in BOTH_EYES and not eye_required:
        return (patient, ""), None
    eye = EYE_WORDS.get(text)
    if eye is None:
        return None, Unused(source, f"row {row_no}", "bad row", f"eye must be R or L (or OD/OS), got {text!r}")
    return (patient, eye), None


def read_labels(path: Path) -> tuple[Keyed, list[Unused]]:
    rows = _rows(path, ("patient_id", "label"), {"patient_id", "eye", "label"})
    table, unused = Keyed(), []
    for row_no, row in rows:
        key, problem = _key("labels", row_no, row, eye_required=False)
        label = _LABELS.get(row.get("label", "").lower())
        if problem is None and label is None:
            valid = ", ".join(lab.value for lab in DIAGNOSTIC_LABELS)
            problem = Unused("labels", f"row {row_no}", "unknown label", f"{row.get('label')!r} is not one of {valid}")
        if problem is None and key in table.values:
            problem = Unused(
                "labels", f"row {row_no}", "bad row", f"repeats row {table.rows[key]} (same patient and eye)"
            )
        if problem is not None:
            unused.append(problem)
            continue
        table.values[key], table.rows[key] = label, row_no
    return table, unused


def read_measurements(path: Path) -> tuple[Keyed, list[Unused]]:
    keys = [b.key for b in BIOMARKERS]
    rows = _rows(path, ("patient_id", "eye"), {"patient_id", "eye", *keys})
    table, unused = Keyed(), []
    for row_no, row in rows:
        key, problem = _key("measurements", row_no, row, eye_required=True)
        if problem is None and key in table.values:
            problem = Unused("measurements", f"row {row_no}", "bad row", f"repeats row {table.rows[key]} (same eye)")
        if problem is not None:
            unused.append(problem)
            continue
        values: dict[str, float] = {}
        for name in keys:
            value, bad = _value(name, row.get(name, ""))
            if bad:
                unused.append(Unused("measurements", f"row {row_no}, column {name}", "bad value", bad))
            elif not math.isnan(value):
                values[name] = value
        table.values[key], table.rows[key] = values, row_no
    return table, unused


def _value(name: str, text: str) -> tuple[float, str]:
    """(value, "") or (nan, why it is not used)."""
    if text.lower() in NAN_TEXTS:
        return math.nan, ""
    try:
        value = float(text)
    except ValueError:
        return math.nan, f"not a number: {text!r}"
    low, high = BY_KEY[name].plausible
    if not low <= value <= high:
        return math.nan, f"{text} outside the plausible range {low:g}-{high:g} [{BY_KEY[name].unit}]"
    return value, ""
