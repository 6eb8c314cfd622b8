"""SR delivery against real peers: DCMTK storescp (down, then up) and a grok-pacs listener that rejects us.

Every C-STORE storescp receives becomes its own file (+uf), so "arrives once" counts receptions.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from devtools.ports import free_port
from devtools.storescp import StoreSCP
from grok_pacs.analysis.result import Eye
from grok_pacs.config import load_settings
from grok_pacs.delivery.sender import DeliveryOutcome, deliver, give_up, retry_delay_s, update_study_state, write_result
from grok_pacs.dicom.scu import PermanentStoreError, TransientStoreError
from grok_pacs.ingest.listener import Listener
from grok_pacs.report.sr import SRKey, build_sr
from grok_pacs.store.index import InstanceRecord, StudyIndex, StudyState
from grok_pacs.store.outbox import Outbox, OutboxError, OutboxState
from tests.helpers.ophthalmic_dicom import Patient, hand_built_report, make_cfp
from tests.helpers.srcheck import assert_valid_sr


def _settings(data_dir: Path, destination: str | None, **extra):
    return load_settings(
        data_dir=data_dir, destination=destination, dimse_timeout=10, acse_timeout=10, network_timeout=10, **extra
    )


def _queued_study(settings) -> tuple[StudyIndex, Outbox, str]:
    """One right-eye CFP study in the index (QUEUED v1) and its SR in the outbox; returns the SR UID."""
    patient = Patient()
    cfp = make_cfp(patient, "R")
    index = StudyIndex(settings.resolved_database_url)
    index.add_instance(
        InstanceRecord(
            patient.study_uid,
            cfp.SeriesInstanceUID,
            cfp.SOPInstanceUID,
            cfp.SOPClassUID,
            "OP",
            "R",
            1,
            1000,
            "incoming/x.dcm",
            time.time(),
            "CAMERA",
            "",
            "1.2.840.10008.1.2.1",
        )
    )
    study = index.study(patient.study_uid)
    assert index.mark_queued(patient.study_uid, 1, study.last_received_at)
    key = SRKey(patient.study_uid, 1, "0.1.0", Eye.RIGHT)
    sr = build_sr(hand_built_report("R", [cfp]), [cfp], key)
    relpath = write_result(settings.data_dir, sr)
    outbox = Outbox(settings.resolved_database_url)
    outbox.put(
        sr_uid=key.sop_instance_uid,
        study_uid=patient.study_uid,
        study_version=1,
        bundle_version="0.1.0",
        eye="R",
        path=str(relpath),
    )
    return index, outbox, key.sop_instance_uid


def test_outbox_state_machine(database):
    outbox = Outbox(database)
    row = dict(sr_uid="2.25.1", study_uid="1.2.3", study_version=1, bundle_version="b", eye="R", path="sr/a.dcm")
    assert outbox.put(**row).state is OutboxState.PENDING
    assert outbox.claim("2.25.1", "w1", lease_s=60).state is OutboxState.SENDING
    assert outbox.claim("2.25.1", "w2", lease_s=60) is None  # held by w1
    assert outbox.claim("2.25.1", "w1", lease_s=60) is not None  # w1's redelivered job takes it back
    assert outbox.claim("2.25.1", "w2", lease_s=0.0) is not None  # lease expired: the sender is gone
    with pytest.raises(OutboxError, match="expected SENDING by 'w1'"):
        outbox.mark_delivered("2.25.1", "w1", "PACS@h:1")
    assert outbox.release("2.25.1", "w2", "transient: refused").state is OutboxState.PENDING
    outbox.claim("2.25.1", "w2", lease_s=60)
    done = outbox.mark_delivered("2.25.1", "w2", "PACS@h:1")
    assert (done.state, done.attempts, done.delivered_at is not None) == (OutboxState.DELIVERED, 4, True)
    # A re-run of the same key neither resets nor re-sends a delivered SR.
    assert outbox.put(**row).state is OutboxState.DELIVERED
    assert outbox.claim("2.25.1", "w3", lease_s=0.0) is None
    # A permanently failed SR stays failed when its job runs again (a broker redelivery): no retry loop.
    outbox.put(**{**row, "sr_uid": "2.25.2"})
    outbox.claim("2.25.2", "w1", lease_s=60)
    outbox.mark_failed("2.25.2", "w1", "rejected")
    assert outbox.put(**{**row, "sr_uid": "2.25.2"}).state is OutboxState.FAILED
    assert outbox.claim("2.25.2", "w2", lease_s=0.0) is None
    with pytest.raises(OutboxError, match="not in the outbox"):
        outbox.claim("2.25.404", "w1", lease_s=60)


def test_pacs_down_then_up_delivers_exactly_once(tmp_path, database):
    port = free_port()
    database_url = "" if isinstance(database, Path) else database  # empty: the SQLite file in the data dir
    settings = _settings(tmp_path / "data", f"PACS@127.0.0.1:{port}", database_url=database_url)
    index, outbox, sr_uid = _queued_study(settings)
    with pytest.raises(TransientStoreError, match=f"PACS@127.0.0.1:{port}"):
        deliver(settings, outbox, sr_uid, owner="job-1")
    entry = outbox.get(sr_uid)
    assert (entry.state, entry.attempts) == (OutboxState.PENDING, 1) and entry.last_error.startswith("transient")
    assert update_study_state(settings, index, outbox, entry.study_uid, 1) is StudyState.DELIVERING
    # A restart (new process, new connection) still finds the SR waiting.
    restarted = Outbox(settings.resolved_database_url)
    assert [e.sr_uid for e in restarted.undelivered(lease_s=60)] == [sr_uid]
    pacs = StoreSCP(port, tmp_path / "pacs").start()
    try:
        assert deliver(settings, restarted, sr_uid, owner="job-2") is DeliveryOutcome.DELIVERED
        assert deliver(settings, restarted, sr_uid, owner="job-3") is DeliveryOutcome.ALREADY_DELIVERED
        assert pacs.received_sop_uids() == [sr_uid]
    finally:
        pacs.stop()
    assert update_study_state(settings, index, outbox, entry.study_uid, 1) is StudyState.DONE
    study = index.study(entry.study_uid)
    assert study.state is StudyState.DONE and f"PACS@127.0.0.1:{port}" in study.detail
    # The copy under sr/ stays, and is the SR that was sent.
    kept = settings.data_dir / outbox.get(sr_uid).path
    assert kept.is_file() and kept.parent.parent.name == "sr"
    assert_valid_sr(kept, "Glaucoma")


@pytest.mark.parametrize(
    "allowed_aes, reason",
    [
        (["SOMEONE_ELSE"], "Calling AE title not recognised"),  # the PACS rejects our AE title
        ([], "not supported"),  # a grok-pacs listener accepts us but offers no SR storage class
    ],
)
def test_permanent_failure_fails_at_once_without_retry(tmp_path, allowed_aes, reason):
    pacs_settings = load_settings(
        data_dir=tmp_path / "pacs", port=free_port(), bind_address="127.0.0.1", ae_title="PACS", allowed_aes=allowed_aes
    )
    pacs = Listener(pacs_settings, StudyIndex(pacs_settings.index_path))
    pacs.start()
    try:
        settings = _settings(tmp_path / "data", f"PACS@127.0.0.1:{pacs_settings.port}")
        index, outbox, sr_uid = _queued_study(settings)
        with pytest.raises(PermanentStoreError, match=reason):
            deliver(settings, outbox, sr_uid, owner="job-1")
        # Nothing is sent again: the row is FAILED, a second call returns without a network attempt.
        assert deliver(settings, outbox, sr_uid, owner="job-2") is DeliveryOutcome.GAVE_UP
    finally:
        pacs.stop()
    entry = outbox.get(sr_uid)
    assert (entry.state, entry.attempts) == (OutboxState.FAILED, 1)
    assert update_study_state(settings, index, outbox, entry.study_uid, 1) is StudyState.FAILED
    detail = index.study(entry.study_uid).detail
    assert "delivery failed" in detail and reason in detail


def test_retries_exhausted_give_up_and_backoff_doubles(tmp_path):
    settings = _settings(
        tmp_path / "data", f"PACS@127.0.0.1:{free_port()}", delivery_backoff_s=2, delivery_backoff_max_s=10
    )
    assert [retry_delay_s(settings, n) for n in range(5)] == [2, 4, 8, 10, 10]
    index, outbox, sr_uid = _queued_study(settings)
    with pytest.raises(TransientStoreError):
        deliver(settings, outbox, sr_uid, owner="job-1")
    give_up(outbox, sr_uid, "job-1", "gave up after 9 attempts; last: refused")
    entry = outbox.get(sr_uid)
    assert entry.state is OutboxState.FAILED and "gave up after 9 attempts" in entry.last_error
    assert update_study_state(settings, index, outbox, entry.study_uid, 1) is StudyState.FAILED


def test_no_destination_keeps_the_sr(tmp_path):
    settings = _settings(tmp_path / "data", None)
    index, outbox, sr_uid = _queued_study(settings)
    assert deliver(settings, outbox, sr_uid, owner="job-1") is DeliveryOutcome.NO_DESTINATION
    assert outbox.get(sr_uid).state is OutboxState.PENDING
    assert update_study_state(settings, index, outbox, outbox.get(sr_uid).study_uid, 1) is StudyState.DONE


def _queued_pdf(settings, index: StudyIndex, outbox: Outbox, sr_uid: str) -> str:
    """The study's PDF report beside its SR, queued with it in one transaction; returns the PDF's UID."""
    import pydicom

    from grok_pacs.report.encapsulated import build_encapsulated_pdf
    from grok_pacs.report.keys import ReportKey
    from grok_pacs.report.pdf import build_pdf
    from grok_pacs.report.study import StudyHeader
    from grok_pacs.store.outbox import OutboxRow, ResultKind

    sr = pydicom.dcmread(settings.data_dir / outbox.get(sr_uid).path)
    key = ReportKey(str(sr.StudyInstanceUID), 1, "0.1.0")
    patient_cfp = make_cfp(Patient(patient_id=str(sr.PatientID), study_uid=key.study_uid), "R")
    report = hand_built_report("R", [patient_cfp])
    pdf = build_pdf(StudyHeader.from_dataset(patient_cfp, software="test", made_at="now"), {Eye.RIGHT: report}, {})
    relpath = write_result(
        settings.data_dir, build_encapsulated_pdf(pdf, patient_cfp, report.sources, key, software_version="test")
    )
    outbox.put_many([OutboxRow(key.sop_instance_uid, key.study_uid, 1, "0.1.0", "", str(relpath), kind=ResultKind.PDF)])
    return key.sop_instance_uid


def test_pacs_down_then_up_delivers_sr_and_pdf_report_exactly_once(tmp_path):
    port = free_port()
    settings = _settings(tmp_path / "data", f"PACS@127.0.0.1:{port}")
    index, outbox, sr_uid = _queued_study(settings)
    pdf_uid = _queued_pdf(settings, index, outbox, sr_uid)
    for uid in (sr_uid, pdf_uid):
        with pytest.raises(TransientStoreError):
            deliver(settings, outbox, uid, owner="job-1")
    study_uid = outbox.get(sr_uid).study_uid
    assert update_study_state(settings, index, outbox, study_uid, 1) is StudyState.DELIVERING
    assert "2 result(s) waiting" in index.study(study_uid).detail
    restarted = Outbox(settings.index_path)
    assert {e.sr_uid for e in restarted.undelivered(lease_s=60)} == {sr_uid, pdf_uid}
    pacs = StoreSCP(port, tmp_path / "pacs").start()
    try:
        for uid in (sr_uid, pdf_uid, sr_uid, pdf_uid):  # the second round finds them delivered
            deliver(settings, restarted, uid, owner="job-2")
        assert sorted(pacs.received_sop_uids()) == sorted([sr_uid, pdf_uid])
        (pdf,) = pacs.received_pdfs()
        assert pdf.MIMETypeOfEncapsulatedDocument == "application/pdf" and pdf.StudyInstanceUID == study_uid
    finally:
        pacs.stop()
    assert update_study_state(settings, index, outbox, study_uid, 1) is StudyState.DONE
    assert "1 SR(s) and the PDF report delivered" in index.study(study_uid).detail


def test_an_outbox_made_before_result_kinds_gets_the_column(tmp_path):
    import sqlite3

    from grok_pacs.store.outbox import ResultKind

    db = sqlite3.connect(tmp_path / "index.sqlite")
    db.executescript("""CREATE TABLE outbox (sr_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL,
        study_version INTEGER NOT NULL, bundle_version TEXT NOT NULL, eye TEXT NOT NULL, path TEXT NOT NULL,
        state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '',
        claimed_by TEXT NOT NULL DEFAULT '', claimed_at REAL, destination TEXT NOT NULL DEFAULT '',
        note TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, updated_at REAL NOT NULL, delivered_at REAL);
        INSERT INTO outbox (sr_uid, study_uid, study_version, bundle_version, eye, path, state, created_at,
        updated_at) VALUES ('2.25.7', '1.2', 1, '0.1', 'R', 'sr/1.2/2.25.7.dcm', 'PENDING', 1, 1);""")
    db.commit()
    db.close()
    assert Outbox(tmp_path / "index.sqlite").get("2.25.7").kind is ResultKind.SR
