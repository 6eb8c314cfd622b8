"""A messy PACS export built from the tests' ophthalmic DICOM builders, with its labels and measurements tables.

11 labelled patients (both eyes, CFP + OCT), and every problem a real export has planted once: instances
without laterality, an OCT without its CFP, a duplicate series and a file exported twice, an older visit, a CT
instance, a text file, a truncated DICOM file, a patient without a label; in the tables, labels and
measurements of subjects the export does not have, a label that is not diagnostic, a bad eye, and a third of
the measurements missing (patients 12 and 13 have none at all). `build_messy_export` returns each planted
file with the reason `python -m training.cohort from-dicom` must report; `write_tables` each planted row.
Used by tests/training/test_cohort_from_dicom.py and tests/training/test_retrain_end_to_end.py.
"""

from __future__ import annotations

import csv
import datetime as dt
import shutil
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from grok_pacs.domain.biomarkers import BIOMARKERS
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS
from tests.helpers.ophthalmic_dicom import Patient, make_cfp, make_oct, write

__all__ = ["VISIT", "build_messy_export", "write_tables"]

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
VISIT = dt.datetime(2025, 3, 4, 10, 0, 0)


def _patient(n: int, visit: dt.datetime = VISIT) -> Patient:
    return Patient(
        patient_id=f"MRN{n:04d}X",
        patient_name=f"Doe{n}^Jane",
        birth_date=f"19{40 + n:02d}0{1 + n % 9}1{n % 10}",
        study_uid=generate_uid(),
        study_date=visit.strftime("%Y%m%d"),
    )


def _eye(root: Path, patient: Patient, eye: str, *, cfp: bool = True, oct_: bool = True, visit=VISIT) -> dict:
    """One eye's CFP and OCT under <PatientID>/<study>/<series>/<sop>.dcm (identifying folders, as exports have).
    Each eye's pixels have their own noise (eyes differ, as they do: a cohort of identical images gives the
    encoders' features no spread to fit a distribution to)."""
    files = {}
    study = root / patient.patient_id / patient.study_uid
    seed = int(patient.patient_id[3:7]) * 2 + (eye == "L")
    if cfp:
        ds = make_cfp(patient, eye, acquired=visit, seed=seed)
        files["cfp"] = write(ds, study / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm")
    if oct_:
        ds = make_oct(patient, eye, acquired=visit + dt.timedelta(minutes=5), frames=9, seed=seed)
        files["oct"] = write(ds, study / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm")
    return files


def _ct(path: Path, patient: Patient) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CT_IMAGE, generate_uid(), "CT"
    ds.PatientID, ds.PatientName, ds.StudyDate = patient.patient_id, patient.patient_name, patient.study_date
    ds.StudyInstanceUID, ds.SeriesInstanceUID = patient.study_uid, generate_uid()
    return write(ds, path)


def build_messy_export(root: Path) -> dict:
    """11 labelled patients plus every planted problem; returns what the test checks against."""
    patients = [_patient(n) for n in range(1, 15)]
    planted: dict[str, str] = {}  # path inside the export -> the reason expected
    for p in patients[:11]:
        for eye in ("R", "L"):
            _eye(root, p, eye)
    rel = lambda path: path.relative_to(root).as_posix()  # noqa: E731
    # Instances without laterality: both images of patient 12's right eye.
    no_lat = _eye(root, patients[11], "R")
    for path in no_lat.values():
        ds = pydicom.dcmread(path)
        del ds.ImageLaterality
        if "SharedFunctionalGroupsSequence" in ds:
            del ds.SharedFunctionalGroupsSequence
        ds.save_as(path)
        planted[rel(path)] = "no laterality"
    _eye(root, patients[11], "L")
    # An OCT without its CFP (patient 13's right eye; the left eye is complete).
    planted[rel(_eye(root, patients[12], "R", cfp=False)["oct"])] = "unpaired"
    _eye(root, patients[12], "L")
    # A duplicate series (the OCT acquired twice the same day) and a file exported twice.
    again = make_oct(patients[0], "R", acquired=VISIT, frames=7)
    dup = write(again, root / patients[0].patient_id / "again" / f"{again.SOPInstanceUID}.dcm")
    planted[rel(dup)] = "duplicate"
    first_cfp = next((root / patients[1].patient_id).rglob("*.dcm"))
    copy = root / "copies" / "same.dcm"
    copy.parent.mkdir()
    shutil.copy(first_cfp, copy)
    planted[rel(copy)] = "duplicate"
    # An older visit of patient 3's left eye, a CT instance, a text file and a truncated DICOM file.
    old = _patient(3, VISIT - dt.timedelta(days=400))
    old.patient_id = patients[2].patient_id
    for path in _eye(root, old, "L", visit=VISIT - dt.timedelta(days=400)).values():
        planted[rel(path)] = "extra visit"
    planted[rel(_ct(root / "ct" / "ct1.dcm", patients[0]))] = "refused SOP class"
    (root / "notes.txt").write_text("exported by the PACS\n")
    planted["notes.txt"] = "unreadable"
    truncated = root / "broken.dcm"
    truncated.write_bytes(first_cfp.read_bytes()[:200])
    planted["broken.dcm"] = "unreadable"
    # Patient 14: images, no label.
    for eye in ("R", "L"):
        for path in _eye(root, patients[13], eye).values():
            planted[rel(path)] = "no label"
    return {"patients": patients, "planted": planted}


def write_tables(tmp: Path, patients: list[Patient]) -> tuple[Path, Path, dict[str, str]]:
    labels, measured = tmp / "labels.csv", tmp / "measurements.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "eye", "label"])
        for n, p in enumerate(patients[:13]):
            w.writerow([p.patient_id, "", DIAGNOSTIC_LABELS[n % 4].value])  # 3 or 4 subjects a label
        w.writerow(["GHOST-0001", "R", "AMD"])  # row 15: a patient the export does not have
        w.writerow(["GHOST-0002", "", "Glaucoma"])  # row 16
        w.writerow([patients[0].patient_id, "R", "Cataract"])  # row 17: not a diagnostic label
    keys = [b.key for b in BIOMARKERS]
    with measured.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "eye", *keys])
        for n, p in enumerate(patients[:11]):
            for e, eye in enumerate(("R", "L")):
                # a third of the values missing: every third cell left empty
                w.writerow(
                    [
                        p.patient_id,
                        eye,
                        *("" if (i + n + e) % 3 == 0 else sum(b.normal) / 2 for i, b in enumerate(BIOMARKERS)),
                    ]
                )
        w.writerow(["GHOST-0001", "R", *[""] * len(keys)])  # row 24
        w.writerow([patients[1].patient_id, "X", *[""] * len(keys)])  # row 25: a bad eye
    expected_rows = {
        "labels:row 15": "unknown subject",
        "labels:row 16": "unknown subject",
        "labels:row 17": "unknown label",
        "measurements:row 24": "unknown subject",
        "measurements:row 25": "bad row",
    }
    return labels, measured, expected_rows


def from_dicom_argv(tmp: Path, seed: int = 3, salt_text: str = "") -> tuple[list[str], dict]:
    """The messy export and its tables under `tmp`, and the `from-dicom` arguments a user would type
    (the salt outside the output folder: created by the command, or `salt_text` written there first, which makes
    the pseudonyms and so the split the same in every run); returns them with what the test checks against."""
    export = tmp / "export"
    info = build_messy_export(export)
    labels, measured, expected_rows = write_tables(tmp, info["patients"])
    salt, out = tmp / "secrets" / "salt", tmp / "cohort"
    if salt_text:
        salt.parent.mkdir(parents=True)
        salt.write_text(salt_text + "\n")
    argv = ["from-dicom", str(export), "--labels", str(labels), "--measurements", str(measured), "--out", str(out)]
    argv += ["--salt-file", str(salt), "--seed", str(seed)]
    return argv, {**info, "tmp": tmp, "export": export, "out": out, "salt": salt, "expected_rows": expected_rows}
