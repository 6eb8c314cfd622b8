"""`python -m training.cohort from-reviews` on a grok-pacs data directory: studies received and indexed (real
OP/OPT files under incoming/), their results in the register, and clinicians' reviews of every kind. The
manifest must be one the stages load, carry the clinician's label (a correction beats the AI), name no
patient, and every reviewed result it could not use must be reported with its reason."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from devtools.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedFS
from grok_pacs.config import load_settings
from grok_pacs.dicom.header import read_header
from grok_pacs.ingest.uploader import Uploader
from grok_pacs.store.index import InstanceRecord, StudyIndex
from grok_pacs.store.register import ResultRecord, ResultRegister, ReviewOutcome
from grok_pacs.store.storage import open_blob_store
from grok_pacs.store.uploads import Uploads
from tests.helpers.ophthalmic_dicom import Patient, make_cfp, make_oct, write
from training.cohort.__main__ import main as cohort_main
from training.cohort.pseudonym import pseudonym
from training.manifest import load_manifest

# (patient, eye): (AI label, review outcome or None, clinician's label, what becomes of it)
CASES = {
    (1, "R"): ("AMD", ReviewOutcome.ACCEPTED, "", "AMD"),
    (1, "L"): ("Glaucoma", ReviewOutcome.CORRECTED, "Normal", "Normal"),
    (2, "R"): ("Normal", ReviewOutcome.ACCEPTED, "", "Normal"),
    (2, "L"): ("Glaucoma", ReviewOutcome.REJECTED, "", "rejected"),
    (3, "R"): ("AMD", ReviewOutcome.REJECTED, "Glaucoma", "Glaucoma"),  # rejected, with the right label
    (3, "L"): ("Indeterminate", ReviewOutcome.ACCEPTED, "", "unknown label"),
    (4, "R"): ("DiabeticRetinopathy", ReviewOutcome.ACCEPTED, "", "image gone"),  # its CFP was purged
    (5, "R"): ("Normal", ReviewOutcome.ACCEPTED, "", "unpaired"),  # the result used no OCT
    (6, "R"): ("AMD", None, "", "not reviewed"),  # awaiting review: not a reviewed eye at all
    (7, "R"): ("Glaucoma", ReviewOutcome.ACCEPTED, "", "withdrawn"),  # withdrawn after its review
}
LABELS = {"AMD", "Glaucoma", "Normal", "DiabeticRetinopathy"}


def _patient(n: int) -> Patient:
    return Patient(patient_id=f"MRN-{n:04d}", patient_name=f"Doe^Jane{n}", birth_date=f"19{50 + n}0101")


def _store(data: Path, index: StudyIndex, ds) -> InstanceRecord:
    """Write `ds` where the listener would and index it as the listener does."""
    rel = f"incoming/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
    path = write(ds, data / rel)
    record = InstanceRecord.from_header(
        read_header(path), size=path.stat().st_size, path=rel, received_at=time.time(), calling_ae="MODALITY"
    )
    index.add_instance(record)
    return record


def build_site(data: Path) -> dict:
    """Index every patient's study (both cases' eyes), register one result per case and review it."""
    settings = load_settings(data_dir=data, broker_url="")
    data.mkdir(parents=True)
    index, register = StudyIndex(settings.resolved_database_url), ResultRegister(settings.resolved_database_url)
    patients, results, site = {}, {}, (data, index, register)
    # Patient 2's right eye was reviewed at an earlier visit too: the later review is the eye's row.
    earlier = _review(site, _patient(2), "R", ("AMD", ReviewOutcome.ACCEPTED, ""))
    for (n, eye), (ai_label, outcome, label, _fate) in CASES.items():
        patient = patients.setdefault(n, _patient(n))
        cfp, sr_uid = _review(site, patient, eye, (ai_label, outcome, label), with_oct=(n, eye) != (5, "R"))
        if (n, eye) == (7, "R"):
            register.mark_withdrawn([sr_uid], "safety", rejection_uid=f"{sr_uid}.99")
        if (n, eye) == (4, "R"):
            (data / cfp.path).unlink()  # retention purged the study's files
        results[(n, eye)] = sr_uid
    index.close()
    register.close()
    return {"patients": patients, "results": results, "earlier": earlier[1]}


def _review(site: tuple, patient: Patient, eye: str, case: tuple, *, with_oct: bool = True) -> tuple:
    """One eye's study indexed, its result registered, delivered and (when the case has an outcome) reviewed:
    `site` is (data dir, index, register), `case` (AI label, outcome or None, clinician's label)."""
    data, index, register = site
    ai_label, outcome, label = case
    cfp = _store(data, index, make_cfp(patient, eye, seed=len(patient.patient_name)))
    oct_ = _store(data, index, make_oct(patient, eye, seed=len(patient.patient_name)))
    sr_uid = f"{cfp.study_uid}.{eye == 'R' and 1 or 2}"
    result = ResultRecord(
        sr_uid=sr_uid,
        study_uid=cfp.study_uid,
        study_version=1,
        bundle_version="1.0",
        eye=eye,
        label=ai_label,
        probability=0.8,
        disposition="Refer",
        gradability="gradable",
        pdf_uid="",
        cfp_uid=cfp.sop_uid,
        oct_uid=oct_.sop_uid if with_oct else "",
    )
    register.add_many([result])
    register.mark_delivered(sr_uid, at=time.time())
    if outcome is not None:
        register.record_review(sr_uid, outcome=outcome, reviewer="dr.eye", label=label, note="n")
    return cfp, sr_uid


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("reviews")
    site = build_site(tmp / "data")
    out, salt = tmp / "cohort", tmp / "secret" / "salt"
    argv = ["from-reviews", "--data-dir", str(tmp / "data"), "--out", str(out), "--salt-file", str(salt)]
    assert cohort_main(argv) == 0
    return {**site, "out": out, "salt": salt, "argv": argv, "tmp": tmp}


def test_the_manifest_loads_and_carries_the_clinicians_labels(built: dict) -> None:
    records = load_manifest(built["out"] / "manifest.csv")  # the stages' own loader
    salt = built["salt"].read_text().strip().encode()
    got = {(r.subject_id, r.eye): r.label.value for r in records}
    expected = {
        (pseudonym(salt, _patient(n).patient_id), eye): fate
        for (n, eye), (_ai, _outcome, _label, fate) in CASES.items()
        if fate in LABELS
    }
    assert got == expected
    corrected = next(r for r in records if r.subject_id == pseudonym(salt, "MRN-0001") and r.eye == "L")
    assert (corrected.meta["review"], corrected.meta["ai_label"], corrected.meta["bundle_version"]) == (
        "corrected",
        "Glaucoma",
        "1.0",
    )
    assert all(r.cfp_path.is_file() and r.oct_path.is_file() and r.fovea_frame is not None for r in records)
    split_of = {}
    for r in records:
        assert split_of.setdefault(r.subject_id, r.split) == r.split  # both eyes of a subject in one split


def test_nothing_in_the_cohort_names_a_patient(built: dict) -> None:
    out = built["out"]
    text = "".join((out / name).read_text() for name in ("manifest.csv", "cohort.json", "cohort-report.json"))
    for patient in built["patients"].values():
        for value in (patient.patient_id, patient.patient_name, patient.patient_name.split("^")[1], patient.birth_date):
            assert value not in text
    assert built["salt"].read_text().strip() not in text


def test_every_reviewed_result_not_used_is_reported_with_its_reason(built: dict) -> None:
    report = json.loads((built["out"] / "cohort-report.json").read_text())
    reported = {u["item"]: u["reason"] for u in report["unused"]}
    expected = {
        f"result {built['results'][case]}": fate
        for case, (_ai, outcome, _label, fate) in CASES.items()
        if fate not in LABELS and outcome is not None
    }
    assert reported == {**expected, f"result {built['earlier']}": "extra visit"}
    assert all(u["source"] == "register" for u in report["unused"])
    counts = report["counts"]
    assert counts["reviewed_results"] == 10 and counts["eyes"] == 4
    assert counts["eyes_per_review"] == {"accepted": 2, "corrected": 1, "rejected": 1}


def test_the_table_lists_the_reasons_and_a_rerun_into_the_same_folder_is_refused(
    built: dict, capsys: pytest.CaptureFixture
) -> None:
    out = built["tmp"] / "again"
    argv = [*built["argv"][:4], str(out), *built["argv"][5:]]
    assert cohort_main(argv) == 0
    printed = capsys.readouterr().out
    for reason in ("rejected", "unknown label", "image gone", "unpaired", "withdrawn"):
        assert reason in printed
    assert (out / "manifest.csv").read_text() == (built["out"] / "manifest.csv").read_text()  # same salt, seed
    assert cohort_main(argv) == 2
    assert "not empty" in capsys.readouterr().err


def test_images_only_in_the_object_store_are_fetched_from_it(tmp_path: Path, seaweedfs: SeaweedFS) -> None:
    """Many hosts: the listener uploaded the instances and no longer has them; from-reviews reads the
    objects (verified against their keys); an object missing from the store is reported as gone."""
    data = tmp_path / "data"
    storage = {
        "data_dir": str(data),
        "storage_url": f"s3://{BUCKET}/reviews-{tmp_path.name}",
        "storage_endpoint": seaweedfs.endpoint,
        "storage_access_key": ACCESS_KEY,
        "storage_secret_key": SECRET_KEY,
    }
    settings = load_settings(**storage)
    data.mkdir()
    index, register = StudyIndex(settings.resolved_database_url), ResultRegister(settings.resolved_database_url)
    site, patient = (data, index, register), _patient(8)
    right, _ = _review(site, patient, "R", ("AMD", ReviewOutcome.ACCEPTED, ""))
    left, left_sr = _review(site, patient, "L", ("Normal", ReviewOutcome.CORRECTED, "Glaucoma"))
    uploads, store = Uploads(index.engine), open_blob_store(settings)
    assert Uploader(data, uploads, store).run_once().uploaded == 4
    assert right.study_uid == left.study_uid  # one study, both eyes
    for rec in index.instances(right.study_uid):
        (data / rec.path).unlink()  # gone from the listener's disk: only the object store has them
    gone = uploads.key(left.sop_uid)
    seaweedfs.client().delete_object(Bucket=BUCKET, Key=f"{settings.storage_url.prefix}/{gone}")
    store.close()
    index.close()
    register.close()
    config = tmp_path / "config.toml"
    config.write_text("".join(f'{key} = "{value}"\n' for key, value in storage.items()))
    out = tmp_path / "cohort"
    argv = ["from-reviews", "--config", str(config), "--out", str(out), "--salt-file", str(tmp_path / "salt")]
    assert cohort_main(argv) == 0
    records = load_manifest(out / "manifest.csv")
    assert [(r.eye, r.label.value) for r in records] == [("R", "AMD")]
    assert records[0].cfp_path.is_file() and records[0].oct_path.is_file()
    report = json.loads((out / "cohort-report.json").read_text())
    assert [(u["item"], u["reason"]) for u in report["unused"]] == [(f"result {left_sr}", "image gone")]
    assert not (out / ".fetched").exists()
