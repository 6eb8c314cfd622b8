"""Listener and worker with separate data directories, joined by a database and a real S3 server
(SeaweedFS): once the upload is recorded, the listener's received files can be removed and the worker,
which never reads the listener's disk, still delivers the study's SRs to a real PACS (DCMTK storescp)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from ingest_support import img2dcm_fundus, ingest_settings, running, storescu, wait_until
from pydicom.uid import generate_uid

from devtools.ports import free_port
from devtools.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedFS
from devtools.storescp import StoreSCP
from grok_pacs.config import load_settings
from grok_pacs.jobs import worker
from grok_pacs.jobs.tasks import analyze_study
from grok_pacs.store.index import StudyState


@pytest.fixture
def pacs(tmp_path: Path):
    scp = StoreSCP(free_port(), tmp_path / "pacs").start()
    yield scp
    scp.stop()


def test_srs_arrive_after_the_listeners_files_are_removed(
    tmp_path: Path, seaweedfs: SeaweedFS, tiny_bundle: Path, pacs: StoreSCP
) -> None:
    storage = {
        "storage_url": f"s3://{BUCKET}/many-hosts-{tmp_path.name}",
        "storage_endpoint": seaweedfs.endpoint,
        "storage_access_key": ACCESS_KEY,
        "storage_secret_key": SECRET_KEY,
    }
    listener = ingest_settings(tmp_path / "listener", **storage)
    with running(listener) as service:
        study = generate_uid()
        files = [img2dcm_fundus(tmp_path / "send" / eye, study, eye) for eye in ("R", "L")]
        assert storescu(service.port, *files, options=("-xy",)).returncode == 0
        wait_until(lambda: service.index.study(study).state is StudyState.QUEUED, 20, "the study to be queued")
    shutil.rmtree(listener.data_dir / "incoming")

    settings = load_settings(
        data_dir=tmp_path / "worker",  # empty: nothing of the listener's
        database_url=listener.resolved_database_url,
        bundle=tiny_bundle,
        destination=f"PACS@127.0.0.1:{pacs.port}",
        dimse_timeout=20,
        **storage,
    )
    app = worker.worker_app(settings)
    try:
        summary = analyze_study(study_uid=study, version=1)
    finally:
        app.close()
    assert summary["outcome"] == "analysed", summary
    assert sorted(summary["srs"].values()) == ["delivered", "delivered"]
    assert {sr.StudyInstanceUID for sr in pacs.received_srs()} == {study} and len(pacs.received_srs()) == 2
    assert list((settings.data_dir / "scratch").glob("*")) == []  # the job's copies are gone
