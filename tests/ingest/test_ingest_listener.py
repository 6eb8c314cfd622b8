"""The C-STORE listener against real DCMTK peers on loopback: what a PACS administrator would see."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, generate_uid
from pynetdicom import AE

from devtools.sample_dicom import fundus_photograph, oct_tomography, write
from grok_pacs.config import Peer
from grok_pacs.dicom.scu import PermanentStoreError, TransientStoreError, store_dataset, store_files
from grok_pacs.dicom.status import DimseStatus
from grok_pacs.store.index import StudyState
from tests.helpers.ingest_support import (
    AE as OUR_AE,
)
from tests.helpers.ingest_support import (
    drain_jobs,
    echoscu,
    img2dcm_fundus,
    ingest_settings,
    running,
    stored_files,
    storescu,
    temp_files,
    wait_until,
)


@pytest.fixture
def settings(tmp_path: Path, fast_path: bool):
    return ingest_settings(tmp_path, pynetdicom_fast_path=fast_path)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dcmtk_echo_and_ophthalmic_study_stored_indexed_and_queued(settings, tmp_path: Path) -> None:
    study = generate_uid()
    cfp = img2dcm_fundus(tmp_path / "src", study, "R")
    opt_raw = write(oct_tomography(study, "R", frames=6, rows=48, columns=64), tmp_path / "src" / "opt_raw.dcm")
    opt_j2k = write(
        oct_tomography(study, "L", frames=6, rows=48, columns=64, syntax=JPEG2000Lossless),
        tmp_path / "src" / "opt_j2k.dcm",
    )
    with running(settings) as service:
        assert echoscu(service.port).returncode == 0
        for path, propose in ((cfp, "-xy"), (opt_raw, "-xe"), (opt_j2k, "-xv")):
            done = storescu(service.port, path, options=(propose,))
            assert done.returncode == 0, done.stderr
        wait_until(lambda: service.index.study(study).state is StudyState.QUEUED, 10, "the study to be queued")
        records = {r.sop_uid: r for r in service.index.instances(study)}
    assert len(records) == 3
    by_modality = sorted((r.modality, r.laterality, r.frames, r.transfer_syntax) for r in records.values())
    assert by_modality == [
        ("OP", "R", 1, "1.2.840.10008.1.2.4.50"),
        ("OPT", "L", 6, "1.2.840.10008.1.2.4.90"),
        ("OPT", "R", 6, "1.2.840.10008.1.2.1"),
    ]
    for source in (cfp, opt_raw, opt_j2k):
        original = pydicom.dcmread(source)
        record = records[original.SOPInstanceUID]
        assert record.calling_ae == "TESTSCU" and record.size == (settings.data_dir / record.path).stat().st_size
        stored = pydicom.dcmread(settings.data_dir / record.path)
        if settings.pynetdicom_fast_path:  # its file meta names the sender (crash recovery reads it back)
            assert stored.file_meta.SourceApplicationEntityTitle == "TESTSCU"
        else:  # pynetdicom as released writes none: a recovered orphan then has no calling AE
            assert "SourceApplicationEntityTitle" not in stored.file_meta
        assert stored.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
        assert stored.PixelData == original.PixelData, "pixel bytes are stored exactly as sent"
        assert (stored.pixel_array == original.pixel_array).all()
    assert temp_files(settings) == []
    assert drain_jobs(settings, expect=1) == [("grok_pacs.tasks.analyze_study", {"study_uid": study, "version": 1})]


def test_same_instance_twice_is_idempotent_and_growth_requeues(settings, tmp_path: Path) -> None:
    study = generate_uid()
    first = write(fundus_photograph(study, "R", size=64), tmp_path / "a.dcm")
    with running(settings) as service:
        for _ in range(2):
            assert storescu(service.port, first, options=("-xy",)).returncode == 0
        wait_until(lambda: service.index.study(study).state is StudyState.QUEUED, 10, "version 1")
        [first_stored] = stored_files(settings)
        digest = _sha(first_stored)
        assert storescu(service.port, first, options=("-xy",)).returncode == 0  # after queueing: still a duplicate
        later = write(fundus_photograph(study, "L", size=64), tmp_path / "b.dcm")
        assert storescu(service.port, later, options=("-xy",)).returncode == 0
        wait_until(lambda: service.index.study(study).version == 2, 10, "version 2")
        assert service.index.study(study).instance_count == 2
    assert len(stored_files(settings)) == 2 and _sha(first_stored) == digest
    jobs = drain_jobs(settings, expect=2)
    assert [kwargs["version"] for _, kwargs in jobs] == [1, 2]


def test_refusals_leave_nothing_behind_and_listener_keeps_serving(tmp_path: Path, fast_path: bool) -> None:
    settings = ingest_settings(tmp_path, allowed_aes=["TESTSCU", "GROKSCU"], pynetdicom_fast_path=fast_path)
    peer = Peer(ae_title=OUR_AE, host="127.0.0.1", port=settings.port)
    with running(settings) as service:
        # Unknown calling AE: association rejected (permanent).
        assert echoscu(service.port, calling="INTRUDER").returncode != 0
        with pytest.raises(PermanentStoreError, match="rejected"):
            store_dataset(peer, fundus_photograph(generate_uid(), "R", size=32), calling_ae="INTRUDER", timeout=10)
        # A CT image: its SOP class is refused at negotiation.
        ct = Path(get_testdata_file("CT_small.dcm"))
        done = storescu(service.port, ct, options=("-R",))
        assert done.returncode != 0
        [ct_result] = store_files(peer, [ct], calling_ae="GROKSCU", timeout=10)
        assert ct_result.status == DimseStatus.SOP_CLASS_NOT_SUPPORTED and not ct_result.ok
        # Path traversal in UIDs: failure status, nothing written anywhere.
        evil = fundus_photograph("1.2.3/../../x", "R", size=32)
        evil.SeriesInstanceUID = "../../../../escape"
        evil_path = write(evil, tmp_path / "evil" / "evil.dcm")
        [evil_result] = store_files(peer, [evil_path], calling_ae="GROKSCU", timeout=10)
        assert evil_result.status == DimseStatus.ERROR_INVALID_UID
        assert "UID" in evil_result.message  # the reason travels as ErrorComment
        # A truncated dataset: failure status.
        whole = write(oct_tomography(generate_uid(), "R", frames=4, rows=32, columns=32), tmp_path / "t.dcm")
        data = whole.read_bytes()
        whole.write_bytes(data[: len(data) - 1000])
        [cut_result] = store_files(peer, [whole], calling_ae="GROKSCU", timeout=10)
        assert cut_result.status == DimseStatus.ERROR_INCOMPLETE_DATASET and cut_result.message
        assert stored_files(settings) == [] and temp_files(settings) == []
        assert service.index.studies() == []
        # ...and the listener still serves.
        assert echoscu(service.port).returncode == 0
        good = write(fundus_photograph(generate_uid(), "L", size=32), tmp_path / "good.dcm")
        assert storescu(service.port, good, options=("-xy",)).returncode == 0
    escaped = [p for p in tmp_path.rglob("*") if p.name in ("x", "escape") or p.name.startswith("x.")]
    assert escaped == [] and len(stored_files(settings)) == 1


def test_disk_below_reserve_refuses_the_association_before_any_transfer(tmp_path: Path) -> None:
    settings = ingest_settings(tmp_path, min_free_disk_mb=1 << 40)
    peer = Peer(ae_title=OUR_AE, host="127.0.0.1", port=settings.port)
    with running(settings):
        with pytest.raises(TransientStoreError, match="rejected \\(transient\\).*Local limit exceeded"):
            store_dataset(peer, fundus_photograph(generate_uid(), "R", size=32), calling_ae="GROKSCU", timeout=10)
    assert stored_files(settings) == [] and temp_files(settings) == []


def test_disk_watermark_answers_out_of_resources(tmp_path: Path) -> None:
    """Without a reserve before transfer (transfer_reserve_mb = 0) the watermark refuses each instance."""
    settings = ingest_settings(tmp_path, min_free_disk_mb=1 << 40, transfer_reserve_mb=0)
    peer = Peer(ae_title=OUR_AE, host="127.0.0.1", port=settings.port)
    with running(settings):
        with pytest.raises(TransientStoreError, match="REFUSED_OUT_OF_RESOURCES"):
            store_dataset(peer, fundus_photograph(generate_uid(), "R", size=32), calling_ae="GROKSCU", timeout=10)
    assert stored_files(settings) == [] and temp_files(settings) == []


def test_refusal_reason_reaches_the_sender_as_error_comment(tmp_path: Path, fast_path: bool) -> None:
    """What the log line says is what the sending PACS shows: DCMTK storescu prints the ErrorComment."""
    settings = ingest_settings(
        tmp_path, min_free_disk_mb=1 << 40, transfer_reserve_mb=0, pynetdicom_fast_path=fast_path
    )
    photo = write(fundus_photograph(generate_uid(), "R", size=32), tmp_path / "photo.dcm")
    reason = f"free disk below min_free_disk_mb={1 << 40}"
    with running(settings) as service:
        done = storescu(service.port, photo, options=("-d", "-xy"))
        peer = Peer(ae_title=OUR_AE, host="127.0.0.1", port=settings.port)
        [result] = store_files(peer, [photo], calling_ae="GROKSCU", timeout=10)
    shown = done.stdout + done.stderr
    assert "0xa700" in shown.lower() and f"(0000,0902) LO [{reason}]" in shown
    assert result.status == DimseStatus.REFUSED_OUT_OF_RESOURCES and result.message == reason


def test_error_comment_is_a_valid_lo_value() -> None:
    from grok_pacs.ingest.listener import failure_response

    response = failure_response(DimseStatus.ERROR_INVALID_UID, "UID '1.2\\..\\x' is invalid\n" + "é" * 80)
    comment = response.ErrorComment
    assert response.Status == DimseStatus.ERROR_INVALID_UID and len(comment) == 64 and comment.endswith("...")
    assert comment.startswith("UID '1.2?..?x' is invalid?") and comment.isascii()


def test_association_limit_rejects_then_recovers(tmp_path: Path) -> None:
    settings = ingest_settings(tmp_path, max_associations=1)
    with running(settings) as service:
        holder = AE(ae_title="HOLDER")
        holder.add_requested_context("1.2.840.10008.1.1")
        assoc = holder.associate("127.0.0.1", service.port, ae_title=OUR_AE)
        assert assoc.is_established
        refused = echoscu(service.port)
        assert refused.returncode != 0 and "Rejected" in refused.stderr + refused.stdout
        assoc.release()
        wait_until(lambda: echoscu(service.port).returncode == 0, 10, "a free association slot", step=0.2)


def test_legacy_photography_only_when_enabled(tmp_path: Path) -> None:
    ds = fundus_photograph(generate_uid(), "R", size=32)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture
    path = write(ds, tmp_path / "sc.dcm")
    for enabled, expected in ((False, DimseStatus.SOP_CLASS_NOT_SUPPORTED), (True, DimseStatus.SUCCESS)):
        settings = ingest_settings(tmp_path / str(enabled), accept_legacy_photography=enabled)
        with running(settings):
            peer = Peer(ae_title=OUR_AE, host="127.0.0.1", port=settings.port)
            [result] = store_files(peer, [path], calling_ae="GROKSCU", timeout=10)
        assert result.status == expected
        assert len(stored_files(settings)) == int(enabled)
