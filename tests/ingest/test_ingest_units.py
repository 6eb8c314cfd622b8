"""Ingest building blocks on real files: UID paths, durable writes, index, header check, recovery, Celery config."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path, PurePosixPath

import pytest
from pydicom.uid import JPEG2000Lossless, generate_uid

from devtools.sample_dicom import fundus_photograph, oct_tomography, write
from grok_pacs.config import load_settings
from grok_pacs.dicom.contexts import TRANSFER_SYNTAXES, scp_contexts
from grok_pacs.dicom.header import IncompleteDatasetError, read_header
from grok_pacs.dicom.uids import InvalidUIDError, instance_relpath, is_valid_uid, resolve_inside
from grok_pacs.ingest.assembly import Assembler, recover
from grok_pacs.jobs.app import TASK_ANALYZE_STUDY, create_app
from grok_pacs.store import db
from grok_pacs.store.files import atomic_write_bytes, fsync_dir, remove_temp_files, tmp_dir
from grok_pacs.store.group_commit import GroupCommit, row_index
from grok_pacs.store.index import InstanceRecord, StudyIndex, StudyState


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2.1", "0.0", "2.25.12345678901234567890", "1." + "2" * 62])
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "1",
        "1.2.3/../../x",
        "../1.2",
        "1.2.",
        ".1.2",
        "1..2",
        "1.02",
        "1.2.3 ",
        "1.2.a",
        "1." + "2" * 63,
        "1.2\\3",
        "1.2.3\x00",
        None,
        12,
    ],
)
def test_invalid_uids(uid: object) -> None:
    assert not is_valid_uid(uid)


def test_instance_path_refuses_traversal() -> None:
    assert instance_relpath("1.2", "1.3", "1.4") == PurePosixPath("incoming/1.2/1.3/1.4.dcm")
    with pytest.raises(InvalidUIDError, match="StudyInstanceUID"):
        instance_relpath("1.2.3/../../x", "1.3", "1.4")
    with pytest.raises(InvalidUIDError, match="SOPInstanceUID"):
        instance_relpath("1.2", "1.3", "..")


def test_resolve_inside_blocks_escape(tmp_path: Path) -> None:
    assert resolve_inside(tmp_path, "incoming/a.dcm") == tmp_path.resolve() / "incoming" / "a.dcm"
    with pytest.raises(ValueError, match="leaves the data directory"):
        resolve_inside(tmp_path, "../outside.dcm")


def test_atomic_write_leaves_no_temp_and_sweeps_old_ones(tmp_path: Path) -> None:
    dest = tmp_path / "incoming" / "1.2" / "x.bin"
    atomic_write_bytes(tmp_path, dest, b"payload")
    assert dest.read_bytes() == b"payload"
    assert list(tmp_dir(tmp_path).iterdir()) == []
    old, fresh = tmp_dir(tmp_path) / "rx-old", tmp_dir(tmp_path) / "rx-fresh"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert remove_temp_files(tmp_path, older_than=600) == 1
    assert not old.exists() and fresh.exists()


def _record(study: str, sop: str, received: float, series: str = "1.2.3") -> InstanceRecord:
    return InstanceRecord(
        study,
        series,
        sop,
        "1.2.840.10008.5.1.4.1.1.77.1.5.1",
        "OP",
        "R",
        1,
        10,
        f"incoming/{study}/{series}/{sop}.dcm",
        received,
        "PACS",
        "",
        "1.2.840.10008.1.2.1",
    )


def test_group_commit_shares_one_transaction_among_waiting_callers(tmp_path: Path) -> None:
    """While one commit waits on the disk, the rows of 7 other associations queue and go in ONE next commit."""
    index = StudyIndex(tmp_path / "index.sqlite")
    release = threading.Event()

    def sync_directory(path: Path) -> Future:
        future: Future = Future()
        threading.Thread(target=lambda: (release.wait(10), fsync_dir(path), future.set_result(None))).start()
        return future

    commits = GroupCommit(index, sync_directory)
    results: dict[int, bool] = {}
    threads = [
        threading.Thread(
            target=lambda n=n: results.update({n: commits.commit(_record("1.9", f"1.9.{n}", n), [tmp_path])})
        )
        for n in range(8)
    ]
    threads[0].start()
    deadline = time.monotonic() + 10
    while not index.instances("1.9") and time.monotonic() < deadline:  # the leader waits on its directory
        time.sleep(0.01)
    for thread in threads[1:]:
        thread.start()
    while commits.queued < 7 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for thread in threads:
        thread.join(10)
    assert results == {n: True for n in range(8)} and len(index.instances("1.9")) == 8
    assert (commits.batches, commits.rows) == (2, 8), "the first row alone, then the 7 that queued meanwhile"
    assert commits.commit(_record("1.9", "1.9.3", 9), [tmp_path]) is False, "a known row is not added again"
    rows = row_index(index)  # the listener's: files are the durability record, its commits skip the fsync
    synchronous = []
    for engine in (rows.engine, index.engine):  # one after the other: each connection begins IMMEDIATE
        with engine.connect() as conn:
            synchronous.append(conn.exec_driver_sql("PRAGMA synchronous").scalar())
    assert synchronous == [1, 2], "NORMAL for the listener's rows, FULL for everything else"
    rows.close()
    rows.engine.dispose()
    index.close()
    with pytest.raises(db.DatabaseError, match="closed"):
        commits.commit(_record("1.9", "1.9.20", 9), [tmp_path])  # the index failed: the caller refuses


def test_index_versions_and_guarded_state(database: str | Path) -> None:
    index = StudyIndex(database)
    assert index.add_instance(_record("1.9", "1.9.1", 100.0))
    assert not index.add_instance(_record("1.9", "1.9.1", 101.0)), "same SOP Instance UID twice is idempotent"
    assert index.add_instance(_record("1.9", "1.9.2", 102.0))
    study = index.study("1.9")
    assert (study.state, study.version, study.instance_count) == (StudyState.RECEIVING, 0, 2)
    assert index.due_studies(cutoff=101.0) == []
    assert [s.study_uid for s in index.due_studies(cutoff=102.0)] == ["1.9"]
    assert index.mark_queued("1.9", 1, 102.0)
    assert index.set_state("1.9", StudyState.ANALYSING, version=1)
    assert index.add_instance(_record("1.9", "1.9.3", 200.0)), "the study grows after being queued"
    assert index.study("1.9").state is StudyState.RECEIVING
    assert not index.set_state("1.9", StudyState.DONE, version=1), "an outdated job cannot overwrite the state"
    assert not index.mark_queued("1.9", 2, 102.0), "a stale last_received_at is refused"
    assert index.mark_queued("1.9", 2, 200.0)
    assert (index.study("1.9").state, index.study("1.9").version) == (StudyState.QUEUED, 2)
    assert len(index.instances("1.9")) == 3
    index.close()
    reopened = StudyIndex(database)
    assert reopened.study("1.9").instance_count == 3


def test_header_of_jpeg_and_j2k_instances(tmp_path: Path) -> None:
    study = generate_uid()
    op = write(fundus_photograph(study, "L", size=64), tmp_path / "op.dcm")
    opt = write(
        oct_tomography(study, "R", frames=4, rows=32, columns=32, syntax=JPEG2000Lossless), tmp_path / "opt.dcm"
    )
    header = read_header(op)
    assert (header.study_uid, header.modality, header.laterality, header.frames) == (study, "OP", "L", 1)
    assert header.transfer_syntax == "1.2.840.10008.1.2.4.50"
    header = read_header(opt)
    assert (header.modality, header.laterality, header.frames) == ("OPT", "R", 4)


@pytest.mark.parametrize("cut", [1, 7, 500, 2000])
def test_truncated_files_are_detected(tmp_path: Path, cut: int) -> None:
    for name, ds in {
        "op": fundus_photograph(generate_uid(), "R", size=64),
        "opt": oct_tomography(generate_uid(), "R", frames=4, rows=32, columns=32),
    }.items():
        path = write(ds, tmp_path / f"{name}.dcm")
        read_header(path)  # whole: fine
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - cut])
        with pytest.raises(IncompleteDatasetError):
            read_header(path)


def test_contexts_offer_compressed_syntaxes_for_ophthalmic_classes_only() -> None:
    settings = load_settings(data_dir=Path("/nonexistent"))
    contexts = {cx.abstract_syntax: cx for cx in scp_contexts(settings.accepted_sop_classes)}
    assert "1.2.840.10008.1.1" in contexts
    opt = contexts["1.2.840.10008.5.1.4.1.1.77.1.5.4"]
    for syntax in (
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2",
    ):
        assert syntax in opt.transfer_syntax
    assert "1.2.840.10008.5.1.4.1.1.2" not in contexts  # CT
    assert "1.2.840.10008.5.1.4.1.1.7" not in contexts  # secondary capture only when enabled
    legacy = load_settings(data_dir=Path("/nonexistent"), accept_legacy_photography=True)
    assert "1.2.840.10008.5.1.4.1.1.7" in {cx.abstract_syntax for cx in scp_contexts(legacy.accepted_sop_classes)}
    assert len(TRANSFER_SYNTAXES) == len(set(TRANSFER_SYNTAXES))


def test_celery_app_reliability_settings(tmp_path: Path) -> None:
    app = create_app(load_settings(data_dir=tmp_path, queue="gpu-a100", job_time_limit=1800))
    conf = app.conf
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.task_default_queue == "gpu-a100"
    redis = create_app(load_settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:1/0", job_time_limit=1800))
    assert redis.conf.broker_transport_options["visibility_timeout"] > 1800
    assert "visibility_timeout" not in conf.broker_transport_options  # would break sqlalchemy.create_engine
    assert TASK_ANALYZE_STUDY == "grok_pacs.tasks.analyze_study"


class _RecordingPublisher:
    def __init__(self) -> None:
        self.jobs: list[tuple[str, int]] = []

    def publish(self, study_uid: str, version: int) -> str:
        self.jobs.append((study_uid, version))
        return f"job-{len(self.jobs)}"


def test_recovery_indexes_orphans_quarantines_junk_and_removes_temp_files(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, quiet_period=0.5)
    study = generate_uid()
    ds = fundus_photograph(study, "R", size=64)
    orphan = write(ds, tmp_path / instance_relpath(study, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    junk = tmp_path / "incoming" / study / "1.2.3" / "1.2.4.dcm"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"not dicom")
    (tmp_dir(tmp_path) / "rx-leftover.dcm").write_bytes(b"partial")
    index = StudyIndex(settings.index_path)
    report = recover(settings, index)
    assert (report.temp_files_removed, report.orphans_indexed, report.quarantined) == (1, 1, 1)
    assert [i.path for i in index.instances(study)] == [orphan.relative_to(tmp_path).as_posix()]
    assert not junk.exists() and len(list((tmp_path / "quarantine").iterdir())) == 1
    publisher = _RecordingPublisher()
    assembler = Assembler(settings, index, publisher)
    assert assembler.run_once(now=time.time() + 1) == [(study, 1)], "the recovered complete study is queued"
    assert assembler.run_once(now=time.time() + 2) == [], "and only once"
    assert publisher.jobs == [(study, 1)]


def test_recovery_forgets_rows_whose_file_is_missing(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    index = StudyIndex(settings.index_path)
    study = generate_uid()
    kept = fundus_photograph(study, "R", size=32)
    kept_path = write(kept, tmp_path / instance_relpath(study, kept.SeriesInstanceUID, kept.SOPInstanceUID))
    header = read_header(kept_path)
    index.add_instance(
        InstanceRecord(
            study,
            header.series_uid,
            header.sop_uid,
            header.sop_class_uid,
            "OP",
            "R",
            1,
            kept_path.stat().st_size,
            kept_path.relative_to(tmp_path).as_posix(),
            1.0,
            "PACS",
            "",
            header.transfer_syntax,
        )
    )
    index.add_instance(_record(study, "1.2.999", 2.0))  # its file never became durable
    index.add_instance(_record("1.8", "1.8.1", 3.0))  # a study with no file left at all
    report = recover(settings, index)
    assert report.missing_files == 2
    assert [i.sop_uid for i in index.instances(study)] == [header.sop_uid]
    assert index.study(study).instance_count == 1
    assert index.study("1.8") is None


def test_pynetdicom_tuning_applies_to_this_pynetdicom() -> None:
    """If a pynetdicom upgrade changes the internals the tuning relies on, this fails (it would fall back)."""
    from grok_pacs.dicom import fastpath as pynetdicom_tuning

    assert pynetdicom_tuning.install() and pynetdicom_tuning.install(), "installs once, idempotently"


def test_fast_path_off_restores_pynetdicom_as_released() -> None:
    from pynetdicom import association, dimse, dul

    from grok_pacs.dicom import fastpath

    was_installed = fastpath.installed()
    try:
        assert fastpath.install() and dul.time is not time and association.time is not time
        fastpath.uninstall()
        assert not fastpath.installed() and dul.time is time and association.time is time
        assert all(getattr(owner, name) is value for owner, name, value in fastpath._RELEASED)
        assert dimse.DIMSEServiceProvider.send_msg.__module__ == "pynetdicom.dimse"
    finally:
        if was_installed:
            fastpath.install()


def test_header_agrees_with_pydicom_on_its_test_files() -> None:
    """pydicom's bundled files cover implicit/explicit/big endian, deflated, JPEG, JPEG-LS, J2K, RLE."""
    import warnings

    import pydicom
    import pydicom.data
    from pydicom.errors import InvalidDicomError

    checked = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm")):  # local only
            try:
                ds = pydicom.dcmread(name)
            except InvalidDicomError:  # files without the DICM prefix are not what a C-STORE writes
                continue
            if "PixelData" not in ds or "StudyInstanceUID" not in ds or Path(name).name == "MR_truncated.dcm":
                continue
            header = read_header(Path(name))
            assert (header.study_uid, header.series_uid, header.sop_uid, header.modality) == (
                ds.StudyInstanceUID,
                ds.SeriesInstanceUID,
                ds.SOPInstanceUID,
                ds.get("Modality", ""),
            ), name
            checked.add(str(ds.file_meta.TransferSyntaxUID))
    assert {
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.5",
    } <= checked
    with pytest.raises(IncompleteDatasetError):
        read_header(Path(pydicom.data.__file__).parent / "test_files" / "MR_truncated.dcm")


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC002])
def test_fast_store_response_is_byte_identical_to_pynetdicom(status: int) -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    from grok_pacs.dicom.direct_codec import encode_store_response as _encode_store_response

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status = 65535, status
    rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.77.1.5.4", generate_uid()
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    [pdata] = message.encode_msg(1, 0)
    assert _encode_store_response(rsp) == pdata.presentation_data_value_list[0][1][1:]
    rsp.ErrorComment = "details"
    assert _encode_store_response(rsp) is None, "anything beyond a status goes through pynetdicom"


@pytest.mark.parametrize(
    "code, name, kind",
    [
        (0x0000, "SUCCESS", "success"),
        (0xB007, "WARNING_DATASET_DOES_NOT_MATCH_SOP_CLASS", "warning"),
        (0xA7FF, "REFUSED_OUT_OF_RESOURCES", "transient"),  # the A7xx range: the sender retries later
        (0x0110, "PROCESSING_FAILURE", "transient"),
        (0xC002, "ERROR_INCOMPLETE_DATASET", "permanent"),
        (0xC0AB, "ERROR_CANNOT_UNDERSTAND", "permanent"),
        (0xFE00, "STATUS_0xFE00", "permanent"),
    ],
)
def test_dimse_status_names_and_how_a_sender_treats_them(code: int, name: str, kind: str) -> None:
    from grok_pacs.dicom.status import DimseStatus, category, status_name

    assert status_name(code) == name and category(code).value == kind
    if code in DimseStatus._value2member_map_:
        assert DimseStatus(code) == code and DimseStatus[name] == code
