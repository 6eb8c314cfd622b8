"""Two listeners, each with its own data directory, on one PostgreSQL database (the many-host layout):
each one's recovery and uploader act only on the instances it received (`node_id`, `received_by`)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pydicom
import pytest

from devtools.processes import Redis
from devtools.sample_dicom import fundus_photograph, write
from grok_pacs.config import SettingsError, load_settings
from grok_pacs.store.index import InstanceRecord, StudyIndex, StudyState
from grok_pacs.store.uploads import Uploads
from tests.helpers.ingest_support import drain_jobs, ingest_settings, running, storescu, wait_until


def _send(listener, study: str, eye: str, directory: Path) -> None:
    path = write(fundus_photograph(study, eye, size=32), directory / f"{study}-{eye}.dcm")
    done = storescu(listener.port, path, options=("-xy",))
    assert done.returncode == 0, done.stderr


def test_restarting_one_listener_keeps_the_other_listeners_instances(postgres, tmp_path: Path) -> None:
    redis, url = Redis(tmp_path), postgres.new_database()
    # quiet_period: neither study may be queued while listener A is down and restarting (about a second)
    shared = {"database_url": url, "broker_url": redis.url, "quiet_period": 4.0}
    a, b = (ingest_settings(tmp_path / name, node_id=f"listener-{name}", **shared) for name in ("a", "b"))
    own, other = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    try:
        with running(b) as listener_b:
            with running(a) as listener_a:
                _send(listener_a, own, "R", tmp_path)
                lost = a.data_dir / listener_a.index.instances(own)[0].path
            lost.unlink()  # A's own row whose file is gone: recovery must still forget it
            for eye in ("R", "L"):
                _send(listener_b, other, eye, tmp_path)
            with running(a) as listener_a:  # restart A: B's files are not on A's disk, and not missing
                assert listener_a.recovery.missing_files == 1
                assert listener_a.index.study(own) is None
                assert len(listener_a.index.instances(other)) == 2
                assert listener_a.index.study(other).instance_count == 2
                assert {p.sop_uid for p in Uploads(listener_a.index.engine, "listener-a").pending()} == set()
                assert len(Uploads(listener_a.index.engine, "listener-b").pending()) == 2  # B's to upload
                wait_until(lambda: listener_b.index.study(other).state is StudyState.QUEUED, 20, "B's study queued")
        assert drain_jobs(a, expect=1, timeout=3) == [
            ("grok_pacs.tasks.analyze_study", {"study_uid": other, "version": 1})
        ], "B's study completes once, A's forgotten one is not queued"
    finally:
        redis.stop()


def test_the_embedded_database_is_one_hosts_whatever_its_name(tmp_path: Path) -> None:
    """SQLite is not scoped by node: a one-box container whose host name changed still recovers its rows."""
    record = InstanceRecord("1.9", "1.9.1", "1.9.1.1", "1.2.840.10008.5.1.4.1.1.77.1.5.1", "OP", "R", 1, 10,
                            "incoming/1.9/1.9.1/1.9.1.1.dcm", 1.0, "AE", "", "")  # fmt: skip
    StudyIndex(tmp_path / "index.sqlite", node_id="old-name").add_instance(record)
    renamed = StudyIndex(tmp_path / "index.sqlite", node_id="new-name")
    assert renamed.instance_paths() == {record.path}
    assert [p.sop_uid for p in Uploads(renamed.engine, "new-name").pending()] == [record.sop_uid]


def test_node_id_defaults_to_the_host_name_and_is_validated() -> None:
    assert load_settings().node_id == socket.gethostname()
    assert load_settings(node_id="listener-0.grok").node_id == "listener-0.grok"
    for bad in ("", "a b", "-x", "a/b", "x" * 254):
        with pytest.raises(SettingsError, match="node_id"):
            load_settings(node_id=bad)


def test_the_listener_records_its_node_with_each_instance(tmp_path: Path) -> None:
    """Also on the embedded SQLite, whose listener commits rows through a second engine."""
    from sqlalchemy import select

    from grok_pacs.store import db

    settings = ingest_settings(tmp_path, node_id="box-1")
    study = pydicom.uid.generate_uid()
    with running(settings) as listener:
        _send(listener, study, "R", tmp_path)
        with db.transaction(listener.index.engine, write=False) as conn:
            assert conn.execute(select(db.instances.c.received_by)).scalars().all() == ["box-1"]


def test_a_study_over_two_listeners_waits_for_both_uploads_and_gives_one_job(
    postgres, seaweedfs, tmp_path: Path
) -> None:
    """The many-host layout: one study, one eye to each listener; listener B cannot reach the object store,
    so its instance stays LOCAL and holds the study (A's uploader never takes B's row); once B reaches
    the store, the study is queued once."""
    from devtools.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedFS

    redis, url = Redis(tmp_path), postgres.new_database()
    unreachable = SeaweedFS(tmp_path / "nowhere", start=False)  # ports reserved, nothing listening
    shared = {"database_url": url, "broker_url": redis.url, "quiet_period": 0.5, "storage_timeout": 2}
    store = {"storage_url": f"s3://{BUCKET}/two-listeners-{tmp_path.name}"}
    store |= {"storage_access_key": ACCESS_KEY, "storage_secret_key": SECRET_KEY}
    a = ingest_settings(tmp_path / "a", node_id="a", storage_endpoint=seaweedfs.endpoint, **store, **shared)
    b_cut_off = ingest_settings(tmp_path / "b", node_id="b", storage_endpoint=unreachable.endpoint, **store, **shared)
    study = pydicom.uid.generate_uid()
    try:
        with running(a) as listener_a:
            with running(b_cut_off) as listener_b:
                _send(listener_a, study, "R", tmp_path)
                _send(listener_b, study, "L", tmp_path)
                wait_until(lambda: listener_b.uploader.store_down, 30, "B to find the store unreachable")
                wait_until(lambda: not Uploads(listener_a.index.engine, "a").pending(), 20, "A's upload")
                time.sleep(a.quiet_period + 4 * listener_a.assembler.interval)  # quiet; assembly passes ran
                assert listener_a.index.study(study).state is StudyState.RECEIVING  # B's eye is not stored yet
                assert [p.sop_uid for p in Uploads(listener_a.index.engine, "b").pending()] == [
                    i.sop_uid for i in listener_a.index.instances(study) if i.laterality == "L"
                ]
            b = b_cut_off.model_copy(update={"storage_endpoint": seaweedfs.endpoint})
            with running(b) as listener_b:  # B reaches the store again
                wait_until(lambda: listener_a.index.study(study).state is StudyState.QUEUED, 30, "the study queued")
                time.sleep(1.0)  # both assemblers sweep several times more
                assert listener_a.index.study(study).instance_count == 2
        assert drain_jobs(a, expect=1, timeout=3) == [
            ("grok_pacs.tasks.analyze_study", {"study_uid": study, "version": 1})
        ], "one job for the study, once both eyes are in the store"
    finally:
        redis.stop()
        unreachable.stop()


def test_a_data_directory_keeps_its_listener_name_on_a_server_database(postgres, tmp_path: Path, capsys) -> None:
    """A listener restarted under another name (a recreated container) would never upload or recover its
    instances: it refuses to start, naming the setting and the name to use."""
    from grok_pacs.cli.main import EXIT_USAGE, main

    first = ingest_settings(tmp_path, node_id="listener-0", database_url=postgres.new_database())
    with running(first):
        pass
    renamed = first.model_copy(update={"node_id": "0f3c9a2b71de"})
    with pytest.raises(SettingsError, match="node_id: .* listener 'listener-0'.*GROK_PACS_NODE_ID=listener-0"):
        running(renamed).__enter__()
    with running(first):  # the same name starts again
        pass
    env = {"GROK_PACS_DATA_DIR": str(first.data_dir), "GROK_PACS_DATABASE_URL": first.resolved_database_url}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**env, "GROK_PACS_NODE_ID": "other", "GROK_PACS_PORT": str(first.port)}.items():
            patch.setenv(name, value)
        assert main(["listen"]) == EXIT_USAGE  # the command says why and exits, before listening
    assert "node_id: the data directory" in capsys.readouterr().err


def test_an_own_instance_whose_file_is_lost_before_its_upload_is_refused_once_and_holds_its_study(
    tmp_path: Path, caplog
) -> None:
    from grok_pacs.ingest.uploader import Uploader
    from grok_pacs.store.blobs import LocalBlobStore

    data = tmp_path / "data"
    record = InstanceRecord("1.9", "1.9.1", "1.9.1.1", "1.2.840.10008.5.1.4.1.1.77.1.5.1", "OP", "R", 1, 10,
                            "incoming/1.9/1.9.1/1.9.1.1.dcm", 1.0, "AE", "", "")  # fmt: skip
    index = StudyIndex(data / "index.sqlite", node_id="box")
    index.add_instance(record)  # its file never reached (or left) this disk
    uploads = Uploads(index.engine, "box")
    uploader = Uploader(data, uploads, LocalBlobStore(data))
    passes = [uploader.run_once(), uploader.run_once()]
    assert [(p.uploaded, p.failed, p.store_down) for p in passes] == [(0, 1, False), (0, 1, False)]
    assert uploads.studies_waiting() == {"1.9"}  # the study is not queued without it
    lost = [r for r in caplog.records if "1.9.1.1" in r.getMessage() and "missing" in r.getMessage()]
    assert len(lost) == 1, "logged once, not every pass"
