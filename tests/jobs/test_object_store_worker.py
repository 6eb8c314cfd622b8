"""Listener and workers with separate data directories, joined by a database and a real S3 server
(SeaweedFS). Once the upload is recorded the listener's received files can go: a worker that never reads
the listener's disk analyses the study, its results go to the store with their keys in the outbox, and
when the PACS (DCMTK storescp) was down, another worker with an empty data directory delivers them."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydicom.uid import generate_uid

from devtools.ports import free_port
from devtools.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedFS
from devtools.storescp import StoreSCP
from grok_pacs.config import Settings, load_settings
from grok_pacs.jobs import worker
from grok_pacs.jobs.tasks import analyze_study, deliver_sr
from grok_pacs.store.blobs import BlobKey
from grok_pacs.store.index import StudyState
from grok_pacs.store.outbox import OutboxState
from tests.helpers.ingest_support import img2dcm_fundus, ingest_settings, running, storescu, wait_until


def _worker(data_dir: Path, listener: Settings, tiny_bundle: Path, pacs_port: int, storage: dict):
    settings = load_settings(
        data_dir=data_dir,  # empty: nothing of the listener's, nor of another worker's
        database_url=listener.resolved_database_url,
        bundle=tiny_bundle,
        destination=f"PACS@127.0.0.1:{pacs_port}",
        dimse_timeout=10,
        acse_timeout=10,
        **storage,
    )
    return worker.worker_app(settings)


def test_results_go_through_the_store_and_any_worker_delivers_them(
    tmp_path: Path, seaweedfs: SeaweedFS, tiny_bundle: Path, database: str | Path
) -> None:
    """On both dialects: the SQLite file (hosts in one process here) and a real PostgreSQL server."""
    storage = {
        "storage_url": f"s3://{BUCKET}/many-hosts-{tmp_path.name}",
        "storage_endpoint": seaweedfs.endpoint,
        "storage_access_key": ACCESS_KEY,
        "storage_secret_key": SECRET_KEY,
    }
    database_url = "" if isinstance(database, Path) else database  # empty: the listener's SQLite file
    listener = ingest_settings(tmp_path / "listener", database_url=database_url, **storage)
    with running(listener) as service:
        study = generate_uid()
        files = [img2dcm_fundus(tmp_path / "send" / eye, study, eye) for eye in ("R", "L")]
        assert storescu(service.port, *files, options=("-xy",)).returncode == 0
        wait_until(lambda: service.index.study(study).state is StudyState.QUEUED, 20, "the study to be queued")
    shutil.rmtree(listener.data_dir / "incoming")

    pacs_port = free_port()  # the PACS is down while the first worker analyses
    first = _worker(tmp_path / "worker-1", listener, tiny_bundle, pacs_port, storage)
    try:
        summary = analyze_study(study_uid=study, version=1)
        entries = worker.context_of(first).outbox.for_study(study, 1)
    finally:
        first.close()
    assert summary["outcome"] == "analysed", summary
    assert sorted(summary["srs"].values()) == ["transient", "transient"] and summary["pdf"] == "transient"
    assert {e.state for e in entries} == {OutboxState.PENDING} and len(entries) == 3
    keys = [BlobKey.parse(e.path) for e in entries]  # the outbox holds the results' keys
    assert {key.kind for key in keys} == {"results"}
    assert list((tmp_path / "worker-1" / "scratch").glob("*")) == []  # the job's instance copies are gone
    shutil.rmtree(tmp_path / "worker-1")  # that host is gone with everything it wrote

    pacs = StoreSCP(pacs_port, tmp_path / "pacs").start()
    second = _worker(tmp_path / "worker-2", listener, tiny_bundle, pacs_port, storage)
    try:
        assert [deliver_sr(sr_uid=e.sr_uid, retry_number=1) for e in entries] == ["delivered"] * 3
        assert worker.context_of(second).index.study(study).state is StudyState.DONE
    finally:
        second.close()
        pacs.stop()
    assert {sr.StudyInstanceUID for sr in pacs.received_srs()} == {study} and len(pacs.received_srs()) == 2
    assert len(pacs.received_pdfs()) == 1
