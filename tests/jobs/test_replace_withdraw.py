"""Replacing and withdrawing delivered results, with real parts: the analyse and deliver tasks in-process
(as a worker runs them, the tiny bundle), DCMTK storescp as the PACS, dciodvfy on what it received.

- A study that gains an instance after its results were delivered gets, for its new version, SRs and a PDF
  naming the earlier ones in their Predecessor Documents Sequence, and one IOCM rejection note
  (113001, quality) for the earlier SRs and PDF; every instance arrives exactly once, also when the job
  runs again. The register shows the earlier results REPLACED and the new ones DELIVERED.
- `grok-pacs withdraw` queues a rejection note (113037, safety) that the worker delivers once, marks the
  results WITHDRAWN, writes an audit event, and refuses a second time: nothing is left to withdraw.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pydicom
import pytest

from devtools.ports import free_port
from devtools.storescp import StoreSCP
from grok_pacs.cli.main import EXIT_FAILED, EXIT_OK, main
from grok_pacs.config import load_settings
from grok_pacs.dicom.uids import instance_relpath
from grok_pacs.ingest.assembly import recover
from grok_pacs.jobs import worker
from grok_pacs.jobs.tasks import analyze_study, deliver_sr
from grok_pacs.store.index import StudyState
from grok_pacs.store.outbox import OutboxState, ResultKind
from grok_pacs.store.register import ResultRegister, ResultState
from tests.helpers.ophthalmic_dicom import Patient, make_cfp, write
from tests.helpers.srcheck import dciodvfy_errors, sr_eye

KOS = "1.2.840.10008.5.1.4.1.1.88.59"


@pytest.fixture
def pacs(tmp_path):
    scp = StoreSCP(free_port(), tmp_path / "pacs").start()
    yield scp
    scp.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request, tmp_path, tiny_bundle, pacs):
    """The embedded SQLite index, or a PostgreSQL database (the register's rows in the outbox's transaction)."""
    server = (
        {"database_url": request.getfixturevalue("postgres").new_database()} if request.param == "postgresql" else {}
    )
    return load_settings(
        **server,
        data_dir=tmp_path / "data",
        bundle=tiny_bundle,
        quiet_period=0,
        destination=f"PACS@127.0.0.1:{pacs.port}",
        dimse_timeout=20,
        audit_syslog=f"file:{tmp_path / 'audit.log'}",
    )


@pytest.fixture
def ctx(settings):
    app = worker.worker_app(settings)
    yield worker.context_of(app)
    app.close()


def _arrive(ctx: worker.WorkerContext, datasets, version: int) -> str:
    """Instances put where the listener would, indexed as recovery does, the study queued at `version`."""
    data_dir = Path(ctx.settings.data_dir)
    for ds in datasets:
        write(ds, data_dir / instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    recover(ctx.settings, ctx.index)
    study_uid = str(datasets[0].StudyInstanceUID)
    assert ctx.index.mark_queued(study_uid, version, ctx.index.study(study_uid).last_received_at)
    return study_uid


def _analysed_and_delivered(ctx: worker.WorkerContext, patient: Patient) -> str:
    study_uid = _arrive(ctx, [make_cfp(patient, "R", seed=1), make_cfp(patient, "L", seed=2)], 1)
    summary = analyze_study(study_uid=study_uid, version=1)
    assert sorted(summary["srs"].values()) == ["delivered", "delivered"] and summary["pdf"] == "delivered"
    return study_uid


def _refs(items) -> dict[str, str]:
    """SOP Instance UID -> SOP Class UID of a Hierarchical SOP Instance Reference sequence."""
    return {
        ref.ReferencedSOPInstanceUID: ref.ReferencedSOPClassUID
        for study in items
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }


def _received_kos(pacs: StoreSCP) -> list[Path]:
    return [p for p in sorted(pacs.out_dir.iterdir()) if str(pydicom.dcmread(p).SOPClassUID) == KOS]


def _assert_rejection_note(path: Path, title: str, rejected: set[str]) -> pydicom.Dataset:
    """A clean KOS with the IOCM title and exactly the rejected instances in its evidence and content."""
    assert dciodvfy_errors(path) == []
    note = pydicom.dcmread(path)
    assert (note.ConceptNameCodeSequence[0].CodeValue, note.ConceptNameCodeSequence[0].CodingSchemeDesignator) == (
        title,
        "DCM",
    )
    assert set(_refs(note.CurrentRequestedProcedureEvidenceSequence)) == rejected
    content = {
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for i in note.ContentSequence
        if "ReferencedSOPSequence" in i
    }
    assert content == rejected
    assert note.PatientID == "GROK-TEST-001"  # filed with the patient's study
    return note


def test_a_study_that_gains_an_instance_replaces_its_results_once(ctx, pacs, settings):
    patient = Patient()
    study_uid = _analysed_and_delivered(ctx, patient)
    first = {sr_eye(sr): sr for sr in pacs.received_srs()}
    (first_pdf,) = pacs.received_pdfs()
    register = ResultRegister(ctx.outbox.engine)
    assert {r.state for r in register.for_study(study_uid)} == {ResultState.DELIVERED}

    later = make_cfp(patient, "R", acquired=dt.datetime(2025, 1, 1, 12, 0, 0), seed=3)
    assert _arrive(ctx, [later], 2) == study_uid
    summary = analyze_study(study_uid=study_uid, version=2)
    assert summary["rejection"] == "delivered" and summary["pdf"] == "delivered"
    assert analyze_study(study_uid=study_uid, version=2)["outcome"] == "already-done"  # a job published twice

    received = pacs.received_sop_uids()
    assert len(received) == len(set(received)) == 3 + 3 + 1, "each SR, PDF and note arrives exactly once"
    new = {
        sr_eye(sr): sr
        for sr in pacs.received_srs()
        if sr.SOPInstanceUID not in {s.SOPInstanceUID for s in first.values()}
    }
    for eye in ("R", "L"):  # each new SR names its eye's earlier SR
        assert _refs(new[eye].PredecessorDocumentsSequence) == {first[eye].SOPInstanceUID: first[eye].SOPClassUID}
    (new_pdf,) = [p for p in pacs.received_pdfs() if p.SOPInstanceUID != first_pdf.SOPInstanceUID]
    assert set(_refs(new_pdf.PredecessorDocumentsSequence)) == {first_pdf.SOPInstanceUID}
    for path in pacs.out_dir.iterdir():  # the SRs and PDF with predecessors are valid too
        assert dciodvfy_errors(path) == [], path.name

    (note_path,) = _received_kos(pacs)
    rejected = {first["R"].SOPInstanceUID, first["L"].SOPInstanceUID, first_pdf.SOPInstanceUID}
    note = _assert_rejection_note(note_path, "113001", rejected)
    states = {r.sr_uid: r for r in register.for_study(study_uid)}
    for eye in ("R", "L"):
        old = states[first[eye].SOPInstanceUID]
        assert (old.state, old.replaced_by, old.rejection_uid) == (
            ResultState.REPLACED,
            new[eye].SOPInstanceUID,
            note.SOPInstanceUID,
        )
        assert states[new[eye].SOPInstanceUID].state is ResultState.DELIVERED
    study = ctx.index.study(study_uid)
    assert study.state is StudyState.DONE and "1 rejection note(s)" in study.detail


def test_withdraw_sends_one_audited_rejection_note(ctx, pacs, settings, tmp_path, monkeypatch, capsys):
    study_uid = _analysed_and_delivered(ctx, Patient())
    delivered = {str(ds.SOPInstanceUID) for ds in pacs.received()}
    for name, value in {
        "GROK_PACS_DATA_DIR": str(settings.data_dir),
        "GROK_PACS_DATABASE_URL": settings.database_url.get_secret_value(),
        "GROK_PACS_DESTINATION": f"PACS@127.0.0.1:{pacs.port}",
        "GROK_PACS_AUDIT_SYSLOG": f"file:{tmp_path / 'audit.log'}",
    }.items():
        monkeypatch.setenv(name, value)

    assert main(["withdraw", study_uid, "--reason", "safety"]) == EXIT_OK
    out = capsys.readouterr().out
    note_uid = out.split("rejection note ")[1].split()[0]
    assert out.count("withdrawn: SR") == 2 and "withdrawn: PDF report" in out
    entry = ctx.outbox.get(note_uid)
    assert (entry.kind, entry.state) == (ResultKind.KOS, OutboxState.PENDING)
    assert ctx.index.study(study_uid).state is StudyState.DELIVERING  # the reaper's to finish if the job is lost

    assert deliver_sr(sr_uid=note_uid) == "delivered"  # the job the command published, as the worker runs it
    assert deliver_sr(sr_uid=note_uid) == "already-delivered"
    (note_path,) = _received_kos(pacs)
    _assert_rejection_note(note_path, "113037", delivered)
    assert ctx.index.study(study_uid).state is StudyState.DONE
    records = ResultRegister(ctx.outbox.engine).for_study(study_uid)
    assert {(r.state, r.withdraw_reason, r.rejection_uid) for r in records} == {
        (ResultState.WITHDRAWN, "safety", note_uid)
    }

    audit = (tmp_path / "audit.log").read_text()
    assert "withdrawn (safety): " + note_uid in audit and study_uid in audit
    assert "Test^Retina" not in audit and "GROK-TEST-001" not in audit  # no patient data in the trail

    assert main(["withdraw", study_uid, "--reason", "quality"]) == EXIT_FAILED
    assert "nothing withdrawn" in capsys.readouterr().err
    assert main(["withdraw", "1.2.3.999", "--reason", "quality"]) == EXIT_FAILED
    assert len(pacs.received()) == len(delivered) + 1, "nothing more sent"
