"""The per-host uploader with a real S3 server (SeaweedFS) and a real listener fed by DCMTK storescu:
a study is queued only once all its instances are in the store; a store that is down holds the study
(instances stay LOCAL, no job, nothing deleted, a restart resumes) and it completes when the store is back."""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from devtools.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedFS
from grok_pacs.config import load_settings
from grok_pacs.dicom.uids import resolve_inside
from grok_pacs.ingest.uploader import Uploader
from grok_pacs.jobs import fetch
from grok_pacs.jobs.retry import InstanceReuploading
from grok_pacs.jobs.snapshot import read_study
from grok_pacs.ops import metrics
from grok_pacs.store.blobs import BlobKey
from grok_pacs.store.index import InstanceRecord, StudyIndex, StudyState
from grok_pacs.store.storage import open_blob_store
from grok_pacs.store.uploads import Uploads, UploadState
from tests.helpers.ingest_support import (
    drain_jobs,
    img2dcm_fundus,
    ingest_settings,
    running,
    stored_files,
    storescu,
    wait_until,
)

_prefixes = itertools.count()


def _settings(tmp_path: Path, server: SeaweedFS):
    return ingest_settings(
        tmp_path,
        storage_url=f"s3://{BUCKET}/host-{os.getpid()}-{next(_prefixes)}",
        storage_endpoint=server.endpoint,
        storage_access_key=ACCESS_KEY,
        storage_secret_key=SECRET_KEY,
        storage_timeout=2,
    )


def _uploads_counted(outcome: str) -> float:
    return metrics.REGISTRY.get_sample_value("grok_pacs_uploads_total", {"outcome": outcome})


def _send_study(tmp_path: Path, port: int) -> tuple[str, list[Path]]:
    study = generate_uid()
    files = [img2dcm_fundus(tmp_path / "send" / eye, study, eye) for eye in ("R", "L")]
    done = storescu(port, *files, options=("-xy",))  # propose JPEG Baseline
    assert done.returncode == 0, done.stderr
    return study, files


def _stored_object(server: SeaweedFS, settings, key: BlobKey) -> bytes:
    name = f"{settings.storage_url.prefix}/{key}"
    return server.client().get_object(Bucket=BUCKET, Key=name)["Body"].read()


def test_a_study_is_queued_once_its_instances_are_in_the_store(tmp_path: Path, seaweedfs: SeaweedFS) -> None:
    settings = _settings(tmp_path, seaweedfs)
    with running(settings) as service:
        study, _ = _send_study(tmp_path, service.port)
        wait_until(lambda: service.index.study(study).state is StudyState.QUEUED, 20, "the study to be queued")
        for instance in service.index.instances(study):
            key = service.uploader.uploads.key(instance.sop_uid)
            assert key is not None, "queued with an instance not uploaded"
            local = (settings.data_dir / instance.path).read_bytes()  # the local copy is kept
            assert key.sha256 == hashlib.sha256(local).hexdigest()
            assert _stored_object(seaweedfs, settings, key) == local
    assert [kwargs["study_uid"] for _, kwargs in drain_jobs(settings, expect=1)] == [study]

    shutil.rmtree(settings.data_dir / "incoming")  # the local copies, removed after the upload was recorded
    with running(settings) as service:  # recovery keeps uploaded instances whose file is gone
        assert service.recovery.missing_files == 0
        assert len(service.index.instances(study)) == 2
        assert service.index.study(study).state is StudyState.QUEUED


def test_store_down_holds_the_study_and_it_completes_when_the_store_is_back(tmp_path: Path) -> None:
    server = SeaweedFS(tmp_path / "seaweedfs", start=False)  # ports reserved, server not running: down
    before = {outcome: _uploads_counted(outcome) for outcome in ("uploaded", "store_down")}
    settings = _settings(tmp_path, server)
    try:
        with running(settings) as service:
            study, _ = _send_study(tmp_path, service.port)
            wait_until(lambda: service.uploader.store_down, 30, "the uploader to find the store down")
            time.sleep(settings.quiet_period + 4 * service.assembler.interval)  # quiet, and assembly passes ran
            instances = service.index.instances(study)
            assert len(instances) == 2
            assert {service.uploader.uploads.state(i.sop_uid) for i in instances} == {UploadState.LOCAL}
            assert service.index.study(study).state is StudyState.RECEIVING  # quiet, but not complete
        assert drain_jobs(settings, expect=0, timeout=2) == []
        assert len(stored_files(settings)) == 2  # nothing deleted, also not by the restart below

        with running(settings) as service:  # restart while the store is still down: state is in the database
            assert service.recovery.missing_files == 0 and len(stored_files(settings)) == 2
            server.start()
            wait_until(lambda: service.index.study(study).state is StudyState.QUEUED, 60, "the study to be queued")
            assert {service.uploader.uploads.state(i.sop_uid) for i in instances} == {UploadState.UPLOADED}
        assert _uploads_counted("store_down") > before["store_down"]  # what an operator's dashboard shows
        assert _uploads_counted("uploaded") == before["uploaded"] + 2
        assert [kwargs["study_uid"] for _, kwargs in drain_jobs(settings, expect=1)] == [study]
    finally:
        server.stop()


def _record(study: str, sop: str, received_at: float) -> InstanceRecord:
    path = f"incoming/{study}/{study}.1/{sop}.dcm"
    return InstanceRecord(study, f"{study}.1", sop, "1.2.840.10008.5.1.4.1.1.77.1.5.1", "OP", "R", 1, 10, path,
                          received_at, "MODALITY", "", "1.2.840.10008.1.2.4.50")  # fmt: skip


def test_upload_state_on_both_databases(database) -> None:
    """The upload state (migration 0002 on PostgreSQL): LOCAL until recorded, once, with its key."""
    index = StudyIndex(database)
    uploads = Uploads(index.engine)
    index.add_instances([_record("1.7", "1.7.1", 100.0), _record("1.7", "1.7.2", 101.0), _record("1.8", "1.8.1", 99)])
    assert [p.sop_uid for p in uploads.pending()] == ["1.8.1", "1.7.1", "1.7.2"]  # oldest first
    assert uploads.studies_waiting() == {"1.7", "1.8"}
    key = BlobKey("instances", "1.7", "1.7.1", "a" * 64)
    assert uploads.record("1.7.1", key) is True
    assert uploads.record("1.7.1", key) is False  # recorded once
    assert (uploads.state("1.7.1"), uploads.key("1.7.1")) == (UploadState.UPLOADED, key)
    assert uploads.state("1.7.2") is UploadState.LOCAL and uploads.key("1.7.2") is None
    uploads.record("1.7.2", BlobKey("instances", "1.7", "1.7.2", "b" * 64))
    assert uploads.studies_waiting() == {"1.8"}
    assert uploads.uploaded_paths() == {"incoming/1.7/1.7.1/1.7.1.dcm", "incoming/1.7/1.7.1/1.7.2.dcm"}
    index.close()


def test_a_worker_reads_verified_copies_in_its_own_scratch_not_the_listeners_disk(
    tmp_path: Path, seaweedfs: SeaweedFS
) -> None:
    listener = _settings(tmp_path / "listener", seaweedfs)
    with running(listener) as service:
        study, sent = _send_study(tmp_path, service.port)
        wait_until(lambda: service.index.study(study).state is StudyState.QUEUED, 20, "the study to be queued")
    shutil.rmtree(listener.data_dir / "incoming")  # the worker must not need the listener's files
    shared = {"data_dir": tmp_path / "worker", "database_url": listener.resolved_database_url}
    worker = load_settings(**{**listener.model_dump(), **shared})  # its own data directory, the same database
    index = StudyIndex(worker.resolved_database_url)
    uploads, store = Uploads(index.engine), open_blob_store(worker)
    snapshot = read_study(index, worker, study, 1)
    with fetch.local_copies(worker, uploads, store, snapshot, "job-1") as local:
        for rec in local.instances:
            copy = resolve_inside(worker.data_dir, rec.path)
            assert worker.data_dir / "scratch" / "job-1" in copy.parents
            assert hashlib.sha256(copy.read_bytes()).hexdigest() == uploads.key(rec.sop_uid).sha256
            assert pydicom.dcmread(copy, stop_before_pixels=True).SOPInstanceUID == rec.sop_uid
        assert len(local.instances) == len(sent)
        assert {eye.value for eye, c in local.eyes.items() if c.cfp} == {"R", "L"}  # candidates on the copies
    assert not (worker.data_dir / "scratch" / "job-1").exists()  # removed when the job ends

    key = uploads.key(snapshot.instances[0].sop_uid)
    seaweedfs.client().put_object(Bucket=BUCKET, Key=f"{listener.storage_url.prefix}/{key}", Body=b"tampered")
    with pytest.raises(InstanceReuploading), fetch.local_copies(worker, uploads, store, snapshot, "job-2"):
        pass  # a corrupt object never feeds the model: its listener is asked to put it again
    assert not (worker.data_dir / "scratch" / "job-2").exists()
    assert uploads.state(snapshot.instances[0].sop_uid) is UploadState.REUPLOAD
    store.close()
    index.close()


def test_an_instance_the_store_refuses_stays_local_and_holds_its_study(tmp_path: Path, seaweedfs: SeaweedFS) -> None:
    """The store already holds something else under the instance's key (corrupted out of band): the
    uploader never overwrites it, the instance stays LOCAL, its study is not complete, and the refusal is
    counted once however many passes retry it."""
    settings = _settings(tmp_path, seaweedfs)
    index = StudyIndex(settings.resolved_database_url)
    record = _record("1.9", "1.9.1", time.time())
    source = settings.data_dir / record.path
    source.parent.mkdir(parents=True)
    source.write_bytes(b"DICM instance bytes")
    index.add_instance(record)
    key = BlobKey.for_file("instances", "1.9", "1.9.1", source)
    seaweedfs.client().put_object(Bucket=BUCKET, Key=f"{settings.storage_url.prefix}/{key}", Body=b"other")
    uploader = Uploader(settings.data_dir, Uploads(index.engine), open_blob_store(settings))
    refused = _uploads_counted("refused")
    assert [uploader.run_once().failed for _ in range(3)] == [1, 1, 1]
    assert _uploads_counted("refused") == refused + 1
    assert uploader.uploads.state("1.9.1") is UploadState.LOCAL and uploader.uploads.studies_waiting() == {"1.9"}
    assert source.read_bytes() == b"DICM instance bytes"
    uploader.store.close()
    index.close()
