"""Retention: a delivered study's files go after retention_days, its rows after retention_rows_days; an
undelivered study is never touched; `grok-pacs purge --dry-run` removes nothing; the listener purges by itself."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from devtools.sample_dicom import oct_tomography, write
from grok_pacs.cli.main import main
from grok_pacs.config import Peer, Settings, load_settings
from grok_pacs.delivery.sender import sr_relpath
from grok_pacs.dicom.scu import store_files
from grok_pacs.dicom.uids import instance_relpath
from grok_pacs.ops import metrics
from grok_pacs.store.blobs import BlobKey
from grok_pacs.store.files import atomic_write_bytes
from grok_pacs.store.index import InstanceRecord, StudyIndex, StudyState
from grok_pacs.store.outbox import Outbox
from grok_pacs.store.retention import Retention
from grok_pacs.store.uploads import Uploads
from tests.helpers.ingest_support import AE as OUR_AE
from tests.helpers.ingest_support import ingest_settings, running, stored_files, wait_until

OPT = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # Ophthalmic Tomography Image Storage
RETENTION_S = 1.0  # retention_days for the test: a study delivered more than a second ago is expired


def _send(settings: Settings, tmp_path: Path, study: str, count: int = 2) -> None:
    sources = [
        write(oct_tomography(study, "R", frames=2, rows=32, columns=32, seed=i), tmp_path / "src" / f"{study}-{i}.dcm")
        for i in range(count)
    ]
    results = store_files(Peer(ae_title=OUR_AE, host="127.0.0.1", port=settings.port), sources, "TESTSCU", 20)
    assert all(r.ok for r in results), results


def _finish(settings: Settings, index: StudyIndex, study: str, *, delivered: bool) -> Path:
    """What a worker leaves for a study: its SR under sr/, an outbox row, the study DONE (the outbox row
    DELIVERED, or left PENDING as without a destination). Returns the SR file."""
    sr_uid = generate_uid()
    relpath = sr_relpath(study, sr_uid)
    atomic_write_bytes(settings.data_dir, settings.data_dir / relpath, b"\0" * 4096)
    outbox = Outbox(index.engine)
    outbox.put(sr_uid=sr_uid, study_uid=study, study_version=1, bundle_version="t", eye="R", path=str(relpath))
    if delivered:
        assert outbox.claim(sr_uid, "test", lease_s=60) is not None
        outbox.mark_delivered(sr_uid, "test", "PACS@127.0.0.1:104")
    assert index.set_state(study, StudyState.DONE, "results delivered" if delivered else "no destination")
    return settings.data_dir / relpath


def _files_of(settings: Settings, study: str) -> list[Path]:
    return [p for p in stored_files(settings) if study in p.parts]


@pytest.fixture
def root_logging() -> Iterator[None]:
    """`main` points the root logger at this test's captured stderr: give later tests theirs back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_purge_removes_only_delivered_studies_and_dry_run_nothing(tmp_path: Path, capsys, root_logging) -> None:
    settings = ingest_settings(tmp_path, quiet_period=0.2, retention_days=RETENTION_S / 86400)
    delivered, kept, receiving = generate_uid(), generate_uid(), generate_uid()
    with running(settings) as service:
        for study in (delivered, kept):
            _send(settings, tmp_path, study)
        for study in (delivered, kept):
            wait_until(lambda s=study: service.index.study(s).state is StudyState.QUEUED, 10, "the study queued")
        delivered_sr = _finish(settings, service.index, delivered, delivered=True)
        kept_sr = _finish(settings, service.index, kept, delivered=False)
        _send(settings, tmp_path, receiving)
    old_scratch = settings.data_dir / "scratch" / "deliver-1.2.3" / "left.dcm"
    old_scratch.parent.mkdir(parents=True)
    old_scratch.write_bytes(b"\0" * 100)
    os.utime(old_scratch, (time.time() - 2 * 86400,) * 2)
    time.sleep(RETENTION_S + 0.2)
    config = tmp_path / "grok.toml"
    config.write_text(
        f'data_dir = "{settings.data_dir}"\nretention_days = {RETENTION_S / 86400}\n'
        f"retention_rows_days = {2 * RETENTION_S / 86400}\n"
    )
    before = sorted(p for p in settings.data_dir.rglob("*") if p.is_file() and "index.sqlite" not in p.name)

    assert main(["--config", str(config), "purge", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"study {delivered}: would remove 2 instances, 1 results" in out, out
    assert kept not in out and receiving not in out
    assert "would remove: 1 studies, 1 scratch files" in out
    assert sorted(p for p in settings.data_dir.rglob("*") if p.is_file() and "index.sqlite" not in p.name) == before

    purged_bytes = metrics.PURGED_BYTES._value.get()
    assert main(["--config", str(config), "purge"]) == 0
    out = capsys.readouterr().out
    assert f"study {delivered}: removed 2 instances, 1 results" in out, out
    assert "removed: 1 studies, 1 scratch files" in out
    index = StudyIndex(settings.resolved_database_url)
    try:
        assert _files_of(settings, delivered) == [] and not delivered_sr.exists() and not old_scratch.exists()
        assert not (settings.data_dir / "incoming" / delivered).exists() and not delivered_sr.parent.exists()
        assert index.instances(delivered) == []
        assert "purged by retention (2 instances, 1 results)" in index.study(delivered).detail
        for study in (kept, receiving):  # undelivered: everything stays
            assert len(_files_of(settings, study)) == 2 and len(index.instances(study)) == 2
        assert kept_sr.exists() and index.study(kept).state is StudyState.DONE
        assert metrics.PURGED_BYTES._value.get() > purged_bytes + 4096

        time.sleep(RETENTION_S)  # past retention_rows_days: the delivered study's rows go too
        assert main(["--config", str(config), "purge"]) == 0
        assert f"study {delivered}: removed 0 instances, 0 results (0 objects), 0 bytes, and its rows" in (
            capsys.readouterr().out
        )
        assert index.study(delivered) is None and Outbox(index.engine).for_study(delivered) == []
        assert index.study(kept) is not None and index.study(receiving) is not None
    finally:
        index.close()


def test_listener_purges_delivered_studies_by_itself(tmp_path: Path) -> None:
    settings = ingest_settings(tmp_path, quiet_period=0.2, retention_days=RETENTION_S / 86400, retention_interval_s=0.5)
    delivered, receiving = generate_uid(), generate_uid()
    with running(settings) as service:
        _send(settings, tmp_path, delivered)
        wait_until(lambda: service.index.study(delivered).state is StudyState.QUEUED, 10, "the study queued")
        delivered_sr = _finish(settings, service.index, delivered, delivered=True)
        _send(settings, tmp_path, receiving)
        # Rows go last: once they are gone, so are the files.
        wait_until(lambda: service.index.instances(delivered) == [], 10, "the listener's retention pass")
        assert _files_of(settings, delivered) == [] and not delivered_sr.exists()
        assert len(_files_of(settings, receiving)) == 2 and len(service.index.instances(receiving)) == 2


def _instance(index: StudyIndex, data_dir: Path, study: str) -> Path:
    """One received instance as the listener leaves it: its file under incoming/ and its row (this node's)."""
    sop, series = generate_uid(), generate_uid()
    relpath = instance_relpath(study, series, sop)
    atomic_write_bytes(data_dir, data_dir / relpath, b"\0" * 1000)
    record = InstanceRecord(study, series, sop, OPT, "OPT", "R", 1, 1000, str(relpath), time.time(), "T", "", "")
    assert index.add_instance(record)
    return data_dir / relpath


def test_listeners_sharing_postgresql_each_purge_their_own_files(postgres, tmp_path: Path) -> None:
    """Two listeners on one PostgreSQL database: each removes the files it received, and a study's rows
    go only once no node holds an instance of it."""
    database = postgres.new_database()
    nodes = {name: (tmp_path / name, StudyIndex(database, node_id=name)) for name in ("a", "b")}
    study = generate_uid()
    files = {name: _instance(index, data_dir, study) for name, (data_dir, index) in nodes.items()}
    index = nodes["a"][1]
    sr_uid = generate_uid()
    outbox = Outbox(index.engine)
    outbox.put(sr_uid=sr_uid, study_uid=study, study_version=1, bundle_version="t", eye="R", path="")
    outbox.claim(sr_uid, "test", lease_s=60)
    outbox.mark_delivered(sr_uid, "test", "PACS@127.0.0.1:104")
    assert index.set_state(study, StudyState.DONE, "delivered")
    time.sleep(RETENTION_S + 0.2)
    try:
        for name, (data_dir, node_index) in nodes.items():
            settings = load_settings(
                data_dir=data_dir,
                node_id=name,
                retention_days=RETENTION_S / 86400,
                retention_rows_days=RETENTION_S / 86400,
            )
            report = Retention(settings, node_index.engine).run()
            assert not files[name].exists()
            if name == "a":  # b's instance row and file are b's to remove: the study's rows stay
                assert [s.rows for s in report.studies] == [False] and index.study(study) is not None
                assert files["b"].exists()
        assert index.study(study) is None and index.instances(study) == []
    finally:
        for _, node_index in nodes.values():
            node_index.close()


def test_purge_deletes_the_studys_objects_in_the_object_store(seaweedfs, tmp_path: Path) -> None:
    from tests.store.test_blobs import _s3_store

    store = _s3_store(seaweedfs)
    data_dir = tmp_path / "data"
    index = StudyIndex(tmp_path / "index.sqlite")
    try:
        study, sr_uid = generate_uid(), generate_uid()
        local = _instance(index, data_dir, study)
        instance_key = BlobKey.for_file("instances", study, local.stem, local)
        result = tmp_path / "sr.dcm"
        result.write_bytes(b"\1" * 2000)
        result_key = BlobKey.for_file("results", study, sr_uid, result)
        for key, source in ((instance_key, local), (result_key, result)):
            assert store.put(key, source)
        assert Uploads(index.engine).record(local.stem, instance_key)
        outbox = Outbox(index.engine)
        outbox.put(sr_uid=sr_uid, study_uid=study, study_version=1, bundle_version="t", eye="R", path=str(result_key))
        outbox.claim(sr_uid, "test", lease_s=60)
        outbox.mark_delivered(sr_uid, "test", "PACS@127.0.0.1:104")
        assert index.set_state(study, StudyState.DONE, "delivered")
        time.sleep(RETENTION_S + 0.2)
        settings = load_settings(data_dir=data_dir, retention_days=RETENTION_S / 86400)
        [purge] = Retention(settings, index.engine, store).run().studies
        assert (purge.instances, purge.results, purge.objects, purge.bytes) == (1, 1, 2, 1000 + 1000 + 2000)
        assert not store.exists(instance_key) and not store.exists(result_key) and not local.exists()
    finally:
        index.close()
        store.close()
