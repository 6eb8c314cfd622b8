"""The analyse task in-process with the tiny bundle: per-eye selection, SRs, delivery to DCMTK storescp.

Studies enter the data directory the way crash recovery indexes them (the listener's own header reader),
then `analyze_study` runs as a worker would run it. Documented results (grok_pacs.jobs.study_job):
- both eyes -> two SRs (one per eye), newest CFP of an eye used; only CFP / only OCT -> one SR that says
  which modality was missing; an undecodable instance is skipped (the next newest is used) and the skip
  is shown with the study; an eye with nothing decodable gets an SR without diagnosis giving the reason;
  no usable eye -> FAILED with the reason; a re-run never sends a second copy.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pydicom
import pytest

from devtools.ports import free_port
from devtools.storescp import StoreSCP
from grok_pacs.config import load_settings
from grok_pacs.dicom.uids import instance_relpath
from grok_pacs.ingest.assembly import recover
from grok_pacs.jobs import worker
from grok_pacs.jobs.tasks import analyze_study
from grok_pacs.report.render import render
from grok_pacs.store.index import StudyState
from grok_pacs.store.outbox import OutboxState, ResultKind
from tests.helpers.ophthalmic_dicom import Patient, make_cfp, make_oct, make_undecodable_cfp, write
from tests.helpers.srcheck import assert_valid_sr, dciodvfy_errors, pdf_text, sr_eye

EARLY = dt.datetime(2025, 1, 1, 9, 0, 0)
LATE = dt.datetime(2025, 1, 1, 11, 0, 0)


@pytest.fixture
def pacs(tmp_path):
    scp = StoreSCP(free_port(), tmp_path / "pacs").start()
    yield scp
    scp.stop()


@pytest.fixture
def app(tmp_path, tiny_bundle, pacs):
    settings = load_settings(
        data_dir=tmp_path / "data",
        bundle=tiny_bundle,
        quiet_period=0,
        destination=f"PACS@127.0.0.1:{pacs.port}",
        dimse_timeout=20,
    )
    app = worker.worker_app(settings)
    yield app
    app.close()


@pytest.fixture
def ctx(app):
    return worker.context_of(app)


def _ingest(ctx: worker.WorkerContext, datasets) -> str:
    """Put the instances where the listener would, index them as recovery does, queue version 1."""
    data_dir = Path(ctx.settings.data_dir)
    for ds in datasets:
        write(ds, data_dir / instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    recover(ctx.settings, ctx.index)
    study_uid = str(datasets[0].StudyInstanceUID)
    study = ctx.index.study(study_uid)
    assert ctx.index.mark_queued(study_uid, 1, study.last_received_at)
    return study_uid


def _refs(sr: pydicom.Dataset) -> set[str]:
    return {
        ref.ReferencedSOPInstanceUID
        for item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in item.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }


def _sr_by_eye(pacs: StoreSCP) -> dict[str, pydicom.Dataset]:
    out = {}
    for sr in pacs.received_srs():
        eye = sr_eye(sr)
        assert eye not in out, "two SRs for one eye"
        out[eye] = sr
    return out


def _sr_entry(ctx: worker.WorkerContext, study_uid: str):
    (entry,) = [e for e in ctx.outbox.for_study(study_uid) if e.kind is ResultKind.SR]
    return entry


def _diagnosis(sr: pydicom.Dataset) -> str:
    """The coded diagnosis' meaning, as the SR states it."""

    def walk(items):
        for item in items:
            if item.get("ValueType") == "CODE" and item.ConceptNameCodeSequence[0].CodeMeaning == "Diagnosis":
                yield item.ConceptCodeSequence[0].CodeMeaning
            yield from walk(item.get("ContentSequence", []))

    (meaning,) = walk(sr.ContentSequence)
    return meaning


def _nums(sr: pydicom.Dataset) -> list[str]:
    """The code values of every NUM in the SR."""

    def walk(items):
        for item in items:
            if item.ValueType == "NUM":
                yield item.ConceptNameCodeSequence[0].CodeValue
            yield from walk(item.get("ContentSequence", []))

    return list(walk(sr.ContentSequence))


def _num_count(sr: pydicom.Dataset) -> int:
    """The biomarker measurements (the diagnosis' score, a GROK-DX NUM, is counted by `_score_count`)."""
    return sum(1 for value in _nums(sr) if not value.startswith("GROK-DX"))


def _score_count(sr: pydicom.Dataset) -> int:
    """NUMs stating the diagnosis' score (what OHIF's SR viewport draws as the diagnosis)."""
    return sum(1 for value in _nums(sr) if value.startswith("GROK-DX"))


def test_both_eyes_newest_cfp_two_srs_once(ctx, pacs):
    patient = Patient()
    old_r, new_r = make_cfp(patient, "R", acquired=EARLY, seed=1), make_cfp(patient, "R", acquired=LATE, seed=2)
    oct_r, cfp_l = make_oct(patient, "R"), make_cfp(patient, "L", use_image_laterality=False)
    oct_l = make_oct(patient, "L")
    study_uid = _ingest(ctx, [old_r, new_r, oct_r, cfp_l, oct_l])
    summary = analyze_study(study_uid=study_uid, version=1)
    assert summary["outcome"] == "analysed" and sorted(summary["srs"].values()) == ["delivered", "delivered"]
    assert summary["pdf"] == "delivered"
    srs = _sr_by_eye(pacs)
    assert set(srs) == {"R", "L"} and len(pacs.received()) == 3  # and one PDF report for the study
    (pdf,) = pacs.received_pdfs()
    assert pdf.StudyInstanceUID == study_uid and pdf.PatientID == patient.patient_id
    text = pdf_text(pdf.EncapsulatedDocument)
    assert "Right eye (OD)" in text and "Left eye (OS)" in text and "UNVERIFIED / PRELIMINARY" in text
    for sr in srs.values():
        assert _diagnosis(sr) in text
    assert _refs(srs["R"]) == {new_r.SOPInstanceUID, oct_r.SOPInstanceUID}  # newest CFP, not the older one
    assert _refs(srs["L"]) == {cfp_l.SOPInstanceUID, oct_l.SOPInstanceUID}
    for sr in srs.values():
        assert sr.StudyInstanceUID == study_uid and sr.PatientID == patient.patient_id
        assert _num_count(sr) == 37 and _score_count(sr) == 1
    kept = sorted((Path(ctx.settings.data_dir) / "sr" / study_uid).iterdir())
    assert len(kept) == 3
    for path in kept:
        if pydicom.dcmread(path).Modality == "SR":
            assert_valid_sr(path, "Glaucoma", "This report was generated automatically")
        else:
            assert dciodvfy_errors(path) == []
    study = ctx.index.study(study_uid)
    assert study.state is StudyState.DONE and "2 SR(s) and the PDF report delivered" in study.detail
    # Idempotent: the same job again (a redelivery) sends nothing new.
    assert analyze_study(study_uid=study_uid, version=1)["outcome"] == "already-done"
    assert len(pacs.received()) == 3


def test_only_cfp_gives_one_sr_stating_oct_missing(ctx, pacs):
    patient = Patient()
    study_uid = _ingest(ctx, [make_cfp(patient, "L")])
    analyze_study(study_uid=study_uid, version=1)
    (sr,) = pacs.received_srs()
    assert _num_count(sr) == 6 and _score_count(sr) == 1 and sr_eye(sr) == "L" and len(pacs.received_pdfs()) == 1
    path = Path(ctx.settings.data_dir) / _sr_entry(ctx, study_uid).path
    assert_valid_sr(path, "Not available for this eye: OCT")
    assert ctx.index.study(study_uid).state is StudyState.DONE


def test_only_oct_gives_one_sr_stating_cfp_missing(ctx, pacs):
    patient = Patient()
    oct_r = make_oct(patient, "R", frames=12)
    study_uid = _ingest(ctx, [oct_r])
    analyze_study(study_uid=study_uid, version=1)
    (sr,) = pacs.received_srs()
    assert _num_count(sr) == 31 and _score_count(sr) == 1 and _refs(sr) == {oct_r.SOPInstanceUID}
    (pdf,) = pacs.received_pdfs()
    assert "OCT B-scan used: frame" in pdf_text(pdf.EncapsulatedDocument)
    path = Path(ctx.settings.data_dir) / _sr_entry(ctx, study_uid).path
    assert_valid_sr(
        path,
        "Not available for this eye: CFP",
        "OCT B-scan used: frame",
        "On the OCT B-scan the point marks the foveal pit found in it.",
    )  # the test OCT has a pit


def test_undecodable_instance_is_skipped_and_noted(ctx, pacs):
    patient = Patient()
    broken_newest = make_undecodable_cfp(patient, "R", acquired=LATE)
    older_r, oct_r = make_cfp(patient, "R", acquired=EARLY), make_oct(patient, "R")
    broken_only_l = make_undecodable_cfp(patient, "L")
    study_uid = _ingest(ctx, [broken_newest, older_r, oct_r, broken_only_l])
    analyze_study(study_uid=study_uid, version=1)
    srs = _sr_by_eye(pacs)
    assert _refs(srs["R"]) == {older_r.SOPInstanceUID, oct_r.SOPInstanceUID}
    # The left eye had nothing decodable: an SR without diagnosis that says why (issue 15's gate).
    assert _refs(srs["L"]) == {broken_only_l.SOPInstanceUID} and _num_count(srs["L"]) == 0
    assert _score_count(srs["L"]) == 0 and _score_count(srs["R"]) == 1  # no diagnosis drawn for the left eye
    left = next(e for e in ctx.outbox.for_study(study_uid) if e.eye == "L")
    text = assert_valid_sr(
        Path(ctx.settings.data_dir) / left.path,
        "Pixel data cannot be decoded",
        "Image quality insufficient: retake, or refer",
    )
    assert "Diagnosis" not in text
    # Still displayable in OHIF: its one group points into the image it judged.
    assert "Image Region: POINT" in render(Path(ctx.settings.data_dir) / left.path)
    # The PDF report says the same to a reader: no diagnosis for the left eye, and why.
    (pdf,) = pacs.received_pdfs()
    pdf_words = pdf_text(pdf.EncapsulatedDocument)
    assert "Left eye (OS)" in pdf_words and "No diagnosis: the images of this eye are ungradable." in pdf_words
    assert "the language model was not run" in pdf_words
    study = ctx.index.study(study_uid)
    assert study.state is StudyState.DONE
    assert f"CFP {broken_newest.SOPInstanceUID} skipped" in study.detail
    assert f"CFP {broken_only_l.SOPInstanceUID} skipped" in study.detail


def test_no_usable_eye_fails_with_reason(ctx, pacs):
    patient = Patient()
    no_side = make_cfp(patient, "R")
    del no_side.ImageLaterality
    study_uid = _ingest(ctx, [no_side])  # (an undecodable eye now gets an ungradable SR: test above)
    summary = analyze_study(study_uid=study_uid, version=1)
    assert summary["outcome"] == "failed"
    study = ctx.index.study(study_uid)
    assert study.state is StudyState.FAILED
    assert "no readable CFP or OCT" in study.detail and "laterality missing" in study.detail
    assert pacs.received() == [] and ctx.outbox.for_study(study_uid) == []


def test_job_of_an_outdated_version_does_nothing(ctx, pacs):
    patient = Patient()
    study_uid = _ingest(ctx, [make_cfp(patient, "R")])
    late = make_oct(patient, "R")  # arrives after version 1 was queued: the study is receiving again
    write(late, Path(ctx.settings.data_dir) / instance_relpath(study_uid, late.SeriesInstanceUID, late.SOPInstanceUID))
    recover(ctx.settings, ctx.index)
    assert analyze_study(study_uid=study_uid, version=1)["outcome"] == "outdated"
    assert pacs.received() == [] and ctx.index.study(study_uid).state is StudyState.RECEIVING
    assert not ctx.engine_loaded  # a void job does not even load the model
    study = ctx.index.study(study_uid)
    assert ctx.index.mark_queued(study_uid, 2, study.last_received_at)
    analyze_study(study_uid=study_uid, version=2)
    (sr,) = pacs.received_srs()
    assert _refs(sr) == {late.SOPInstanceUID, *(i.sop_uid for i in ctx.index.instances(study_uid))}
    assert [e.state for e in ctx.outbox.for_study(study_uid)] == [OutboxState.DELIVERED] * 2  # SR and PDF


def test_selection_by_sop_class_laterality_and_acquisition_time(tmp_path):
    from grok_pacs.analysis.result import Eye
    from grok_pacs.dicom.sop_classes import SECONDARY_CAPTURE, THICKNESS_MAP
    from grok_pacs.jobs.snapshot import select_candidates
    from grok_pacs.store.index import InstanceRecord

    def rec(sop: str, sop_class: str, laterality: str, acquired: str, received: float) -> InstanceRecord:
        return InstanceRecord(
            "1.2",
            "1.2.3",
            sop,
            sop_class,
            "OP",
            laterality,
            1,
            1,
            f"incoming/{sop}.dcm",
            received,
            "CAM",
            acquired,
            "1.2.840.10008.1.2.1",
        )

    op, opt = "1.2.840.10008.5.1.4.1.1.77.1.5.1", "1.2.840.10008.5.1.4.1.1.77.1.5.4"
    instances = [
        rec("1.1", op, "R", "20250101090000", 5.0),
        rec("1.2", op, "R", "20250101100000.5", 1.0),
        rec("1.3", SECONDARY_CAPTURE, "R", "20250101120000", 1.0),
        rec("1.4", opt, "L", "", 1.0),
        rec("1.5", op, "B", "20250101100000", 1.0),
        rec("1.6", THICKNESS_MAP, "L", "", 1.0),
    ]
    strict = load_settings(data_dir=tmp_path)
    eyes, notes = select_candidates(instances, strict)
    assert [r.sop_uid for r in eyes[Eye.RIGHT].cfp] == ["1.2", "1.1"]  # newest acquisition first
    assert [r.sop_uid for r in eyes[Eye.LEFT].oct] == ["1.4"] and eyes[Eye.LEFT].cfp == []
    assert notes == ["CFP 1.5 skipped: laterality B"]  # both-eyes image: no single eye to report on
    legacy = load_settings(data_dir=tmp_path, accept_legacy_photography=True)
    eyes, _ = select_candidates(instances, legacy)
    assert [r.sop_uid for r in eyes[Eye.RIGHT].cfp] == ["1.3", "1.2", "1.1"]


def test_rerun_after_a_failed_delivery_sends_the_written_sr_without_the_model(app, ctx, pacs):
    patient = Patient()
    study_uid = _ingest(ctx, [make_cfp(patient, "R")])
    pacs.stop()  # the PACS is down: the first attempt fails, a retry goes on the broker
    first = analyze_study(study_uid=study_uid, version=1)
    assert list(first["srs"].values()) == ["transient"] and first["pdf"] == "transient"
    assert ctx.index.study(study_uid).state is StudyState.DELIVERING
    pacs.start()
    restarted = worker.configure(app, ctx.settings)  # a new process, e.g. `grok-pacs serve` requeueing at start
    summary = analyze_study(study_uid=study_uid, version=1)
    assert list(summary["srs"].values()) == ["delivered"] and summary["pdf"] == "delivered"
    assert not restarted.engine_loaded  # the SR and PDF written before were sent as they are
    entries = restarted.outbox.for_study(study_uid)
    assert sorted(e.kind for e in entries) == [ResultKind.PDF, ResultKind.SR]
    assert sorted(pacs.received_sop_uids()) == sorted(e.sr_uid for e in entries)  # each once
    assert all(e.attempts == 2 for e in entries)
    assert restarted.index.study(study_uid).state is StudyState.DONE


def test_job_reads_the_study_once_and_writes_it_at_start_and_end(ctx, pacs, monkeypatch):
    patient = Patient()
    study_uid = _ingest(ctx, [make_cfp(patient, "R"), make_oct(patient, "R"), make_cfp(patient, "L")])
    reads, writes = [], []
    real_read, real_set, real_claim = ctx.index.read_study, ctx.index.set_state, ctx.index.claim_study
    monkeypatch.setattr(ctx.index, "study", lambda *a, **k: pytest.fail("the job re-read the study row"))
    monkeypatch.setattr(ctx.index, "instances", lambda *a, **k: pytest.fail("the job re-read the instances"))
    monkeypatch.setattr(ctx.index, "read_study", lambda uid: reads.append(uid) or real_read(uid))
    monkeypatch.setattr(
        ctx.index, "set_state", lambda uid, state, *a, **k: writes.append(state) or real_set(uid, state, *a, **k)
    )
    monkeypatch.setattr(  # the start write: the job claims the version (QUEUED -> ANALYSING)
        ctx.index, "claim_study", lambda *a, **k: writes.append(StudyState.ANALYSING) or real_claim(*a, **k)
    )
    summary = analyze_study(study_uid=study_uid, version=1)
    assert sorted(summary["srs"].values()) == ["delivered", "delivered"]
    assert reads == [study_uid] and writes == [StudyState.ANALYSING, StudyState.DONE]


def test_delivery_retries_exhausted_fail_the_study_with_the_reason(ctx, pacs):
    from grok_pacs.jobs.tasks import deliver_sr

    ctx.settings = ctx.settings.model_copy(update={"delivery_max_retries": 1})
    study_uid = _ingest(ctx, [make_cfp(Patient(), "R")])
    pacs.stop()
    (sr_uid,) = analyze_study(study_uid=study_uid, version=1)["srs"]
    assert ctx.index.study(study_uid).state is StudyState.DELIVERING
    assert deliver_sr(sr_uid=sr_uid, retry_number=1) == "transient"  # the last retry allowed: given up
    assert ctx.outbox.get(sr_uid).state is OutboxState.FAILED
    study = ctx.index.study(study_uid)
    assert study.state is StudyState.FAILED and "gave up after 2 attempts" in study.detail
    assert pacs.received() == []


def test_both_eyes_of_a_study_share_one_batched_generation(ctx, pacs, monkeypatch):
    """The model runs once per study (one batched generation and label scoring), not once per eye."""
    engine, calls = ctx.engine(), []
    original = engine.analyze_batch
    monkeypatch.setattr(
        engine, "analyze_batch", lambda eyes: calls.append([e.eye.value for e in eyes]) or original(eyes)
    )
    patient = Patient()
    study_uid = _ingest(ctx, [make_cfp(patient, "R"), make_oct(patient, "R"), make_cfp(patient, "L")])
    assert analyze_study(study_uid=study_uid, version=1)["outcome"] == "analysed"
    assert calls == [["R", "L"]] and set(_sr_by_eye(pacs)) == {"R", "L"}


def test_each_picked_image_is_decoded_once_for_gate_model_sr_and_pdf(ctx, pacs, monkeypatch):
    """The pixels decoded to plan an eye are the ones its SR (the point on the foveal pit) and its PDF show."""
    from grok_pacs.analysis import imaging

    patient = Patient()
    study_uid = _ingest(ctx, [make_cfp(patient, "R"), make_oct(patient, "R")])
    decoded, original = [], imaging._dicom_pixels
    monkeypatch.setattr(imaging, "_dicom_pixels", lambda path: decoded.append(Path(path).name) or original(path))
    summary = analyze_study(study_uid=study_uid, version=1)
    assert list(summary["srs"].values()) == ["delivered"] and summary["pdf"] == "delivered"
    assert len(decoded) == 2 and len(set(decoded)) == 2, decoded  # the CFP and the OCT, once each


def test_pdf_report_setting_off_sends_the_srs_only(ctx, pacs):
    ctx.settings = ctx.settings.model_copy(update={"pdf_report": False})
    patient = Patient()
    study_uid = _ingest(ctx, [make_cfp(patient, "R"), make_oct(patient, "R")])
    summary = analyze_study(study_uid=study_uid, version=1)
    assert list(summary["srs"].values()) == ["delivered"] and "pdf" not in summary
    assert len(pacs.received_srs()) == 1 and pacs.received_pdfs() == []
    assert [e.kind for e in ctx.outbox.for_study(study_uid)] == [ResultKind.SR]
    assert "1 SR(s) delivered" in ctx.index.study(study_uid).detail
