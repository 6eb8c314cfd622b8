"""`python -m training.cohort from-dicom` on a messy PACS export, and `training.pipeline --manifest` planning on it.

The export is built here from the tests' ophthalmic DICOM builders: 11 labelled patients (both eyes, CFP + OCT),
with every problem a real export has planted once, each expected in the report with its reason; nothing is
trained (the plan mode shows which cohort the pipeline would use and its cache keys).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from grok_pacs.domain.biomarkers import BIOMARKERS
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS
from tests.helpers.ophthalmic_dicom import Patient, make_cfp, make_oct, write
from training import pipeline
from training.cohort.__main__ import main as cohort_main
from training.cohort.fingerprint import code_commit
from training.cohort.pseudonym import pseudonym
from training.manifest import load_manifest
from training.pipeline_cli import config_from_args, parse_args
from training.pipeline_cli import main as pipeline_main

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
    """One eye's CFP and OCT under <PatientID>/<study>/<series>/<sop>.dcm (identifying folders, as exports have)."""
    files = {}
    study = root / patient.patient_id / patient.study_uid
    if cfp:
        ds = make_cfp(patient, eye, acquired=visit)
        files["cfp"] = write(ds, study / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm")
    if oct_:
        ds = make_oct(patient, eye, acquired=visit + dt.timedelta(minutes=5), frames=9)
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


def _write_tables(tmp: Path, patients: list[Patient]) -> tuple[Path, Path, dict[str, str]]:
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


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("cohort")
    export = tmp / "export"
    info = build_messy_export(export)
    labels, measured, expected_rows = _write_tables(tmp, info["patients"])
    salt = tmp / "secrets" / "salt"
    out = tmp / "cohort"
    argv = ["from-dicom", str(export), "--labels", str(labels), "--measurements", str(measured), "--out", str(out)]
    rc = cohort_main([*argv, "--salt-file", str(salt), "--seed", "3"])
    assert rc == 0
    return {**info, "tmp": tmp, "export": export, "out": out, "salt": salt, "expected_rows": expected_rows}


def test_every_planted_problem_is_reported_with_its_reason_and_nothing_else_is_lost(built: dict) -> None:
    report = json.loads((built["out"] / "cohort-report.json").read_text())
    by_item = {(u["source"], u["item"]): u["reason"] for u in report["unused"]}
    exported = {k[1]: v for k, v in by_item.items() if k[0] == "export"}
    assert exported == built["planted"]
    assert sum(u["source"] == "export" for u in report["unused"]) == len(exported)  # each file reported once
    rows = {f"{k[0]}:{k[1]}": v for k, v in by_item.items() if k[0] != "export"}
    assert rows == built["expected_rows"]
    counts = report["counts"]
    n_files = sum(1 for p in built["export"].rglob("*") if p.is_file())
    assert counts["files_scanned"] == n_files == counts["files_used"] + counts["files_unused"]
    assert counts["eyes"] == 11 * 2 + 2  # patients 12 and 13 keep their complete left eyes


def test_the_manifest_is_valid_pseudonymised_and_split_by_subject(built: dict) -> None:
    manifest = built["out"] / "manifest.csv"
    records = load_manifest(manifest)
    # The manifest and the cohort description name nobody (the report names export files by their path,
    # which is how the team finds them: it stays with the export's identifiable images).
    text = manifest.read_text() + (built["out"] / "cohort.json").read_text()
    for p in built["patients"]:
        for value in (p.patient_id, p.patient_name, p.birth_date, p.patient_name.split("^")[0]):
            assert value not in text
    salt = built["salt"].read_text().strip().encode()
    assert salt.decode() not in text
    subjects = {pseudonym(salt, p.patient_id) for p in built["patients"][:13]}
    assert {r.subject_id for r in records} == subjects
    split_of = {}
    for r in records:
        assert split_of.setdefault(r.subject_id, r.split) == r.split  # both eyes of a subject in one split
    assert set(split_of.values()) == {"train", "val", "test"}
    first = next(r for r in records if r.subject_id == pseudonym(salt, built["patients"][0].patient_id))
    missing = sum(1 for v in first.biomarkers.values() if v != v)
    assert 0 < missing < len(BIOMARKERS)  # measurements carried, the rest missing (NaN)
    assert all(r.fovea_frame is not None for r in records)  # the runtime's selection found every pit


def test_a_rerun_into_the_same_folder_is_refused(built: dict, capsys: pytest.CaptureFixture) -> None:
    argv = [
        "from-dicom",
        str(built["export"]),
        "--labels",
        str(built["tmp"] / "labels.csv"),
        "--out",
        str(built["out"]),
    ]
    assert cohort_main([*argv, "--salt-file", str(built["salt"])]) == 2
    assert "not empty" in capsys.readouterr().err
    inside = ["--salt-file", str(built["tmp"] / "new" / "salt")]
    argv[-1] = str(built["tmp"] / "new")
    assert cohort_main([*argv, *inside]) == 2
    assert "outside the output" in capsys.readouterr().err


def test_the_pipeline_plans_on_the_given_manifest(built: dict, capsys: pytest.CaptureFixture) -> None:
    manifest = built["out"] / "manifest.csv"
    cache = built["tmp"] / "pipeline-cache"
    assert pipeline_main(["--manifest", str(manifest), "--cache", str(cache), "--plan", "--quiet"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["cohort"]["manifest"] == str(manifest.resolve())
    fingerprint = plan["cohort"]["fingerprint"]
    assert fingerprint["eyes"] == 24 and sum(fingerprint["eyes_per_split"].values()) == 24
    assert fingerprint["devices"]  # the devices named by the images' headers
    phantom = pipeline.step_digests(pipeline.PipelineConfig.small())
    assert plan["steps"]["cohort"]["key"] != phantom["cohort"]
    assert not any(step["cached"] for step in plan["steps"].values())
    assert not cache.exists() or not any(cache.iterdir())  # planning builds nothing
    # Another manifest (one eye fewer) is another cohort: every step's key changes.
    lines = manifest.read_text().splitlines()
    other = built["out"] / "manifest-fewer.csv"  # beside the first: the same relative image paths
    other.write_text("\n".join(lines[:-1]) + "\n")
    assert pipeline_main(["--manifest", str(other), "--cache", str(cache), "--plan"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert all(second["steps"][s]["key"] != plan["steps"][s]["key"] for s in ("cohort", "stage1", "stage2", "bundle"))


def test_the_demo_command_line_keeps_the_demo_configuration() -> None:
    """devtools/demo.py's command line resolves to the configuration (and cache keys) the demo always had."""
    demo = config_from_args(parse_args(["--cache", "c", "--json-out", "o.json"]))
    assert demo == pipeline.PipelineConfig.small()
    assert demo.step_config("cohort") == {"n": 210, "seed": 7, "dicom": True, "dicom_splits": ("test",)}
    assert pipeline.step_digests(demo) == pipeline.step_digests(pipeline.PipelineConfig.small())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "paper"], "--llm DIR"),
        (["--oct-encoder", "x.pth"], "--preset paper"),
        (["--llm", "no-such-dir"], "model directory"),
        (["--manifest", "no-such.csv"], "no file"),
    ],
)
def test_the_pipeline_refuses_options_that_cannot_work(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_paper_options_reach_the_stage_configurations(built: dict, tmp_path: Path) -> None:
    weights = tmp_path / "RETFound.pth"
    weights.write_bytes(b"not read when planning")
    llm = tmp_path / "qwen2-7b"
    llm.mkdir()
    argv = ["--manifest", str(built["out"] / "manifest.csv"), "--preset", "paper", "--oct-encoder", str(weights)]
    cfg = config_from_args(parse_args([*argv, "--llm", str(llm)]))
    oct_cfg, cfp_cfg = cfg.stage2_config("OCT"), cfg.stage2_config("CFP")
    assert (oct_cfg.model_preset, oct_cfg.init_checkpoint, cfp_cfg.init_checkpoint) == ("full", str(weights), "")
    assert (cfg.llm, cfg.stage3.name, cfg.stage3.base_llm_dir) == ("local", "paper", llm)
    assert "base_llm" not in pipeline.step_digests(cfg)  # a local model is used as it is, not converted


def test_an_export_with_nothing_usable_still_reports_every_file(built: dict, capsys) -> None:
    labels = built["tmp"] / "ghost-labels.csv"
    labels.write_text("patient_id,eye,label\nGHOST-0001,,AMD\n")
    out = built["tmp"] / "nothing"
    argv = ["from-dicom", str(built["export"]), "--labels", str(labels), "--out", str(out)]
    assert cohort_main([*argv, "--salt-file", str(built["salt"])]) == 2
    captured = capsys.readouterr()
    assert "no usable eye" in captured.err and "no label" in captured.out
    report = json.loads((out / "cohort-report.json").read_text())
    assert len({u["item"] for u in report["unused"] if u["source"] == "export"}) == report["counts"]["files_scanned"]
    assert not (out / "manifest.csv").exists()


def test_the_commit_is_unknown_outside_a_checkout(tmp_path: Path) -> None:
    assert code_commit(tmp_path) == {"commit": "unknown", "dirty": None}
    here = code_commit()
    assert len(here["commit"]) == 40 and isinstance(here["dirty"], bool)
