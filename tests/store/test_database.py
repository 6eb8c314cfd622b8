"""The database layer on both dialects (the embedded SQLite file and a real PostgreSQL 15 server): batch
inserts, claims that hold across processes, a duplicate analyse job that never runs the model twice."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import create_engine

from devtools.ports import free_port
from devtools.sample_dicom import write
from grok_pacs.cli.main import EXIT_FAILED, EXIT_USAGE, main
from grok_pacs.config import load_settings
from grok_pacs.dicom.status import DimseStatus
from grok_pacs.ingest.listener import Listener
from grok_pacs.jobs import study_job
from grok_pacs.jobs.publisher import job_id
from grok_pacs.jobs.snapshot import StudyOutcome, read_study
from grok_pacs.store import schema
from grok_pacs.store.index import InstanceRecord, StudyIndex, StudyState
from grok_pacs.store.outbox import Outbox, OutboxRow, OutboxState
from grok_pacs.store.schema import SchemaError
from tests.helpers.ophthalmic_dicom import Patient, make_cfp

ROOT = Path(__file__).resolve().parents[2]
OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"


def _record(study: str, sop: str, received: float = 100.0, laterality: str = "R") -> InstanceRecord:
    return InstanceRecord(
        study,
        f"{study}.1",
        sop,
        OP_8BIT,
        "OP",
        laterality,
        1,
        10,
        f"incoming/{study}/{sop}.dcm",
        received,
        "AE",
        "",
        "",
    )


def test_add_instances_is_add_instance_per_record_in_one_transaction(database) -> None:
    index = StudyIndex(database)
    assert index.add_instance(_record("1.5", "1.5.1", 100.0))
    batch = [_record("1.5", "1.5.1", 101.0), _record("1.5", "1.5.2", 102.0), _record("1.6", "1.6.1", 90.0)]
    batch.append(_record("1.5", "1.5.2", 103.0))  # the same instance twice in one batch: stored once
    assert index.add_instances(batch) == [False, True, True, False]
    study = index.study("1.5")
    assert (study.state, study.instance_count, study.first_received_at, study.last_received_at) == (
        StudyState.RECEIVING,
        2,
        100.0,
        102.0,
    )
    assert index.study("1.6").instance_count == 1
    assert index.add_instances([]) == []
    index.close()


def test_quiet_period_runs_on_the_database_clock(database) -> None:
    index = StudyIndex(database)
    index.add_instance(_record("1.7", "1.7.1", received=0.0))  # the sender's clock is irrelevant
    assert index.quiet_studies(60.0) == [], "just written: not quiet for a minute yet"
    time.sleep(0.3)
    assert [s.study_uid for s in index.quiet_studies(0.2)] == ["1.7"]
    index.close()


_RACER = """
import json, sys, time
from pathlib import Path
from grok_pacs.store import schema
from grok_pacs.store.index import StudyIndex
from grok_pacs.store.outbox import Outbox
url, name, gate, rows, studies = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
outbox, index = Outbox(url), StudyIndex(url)
outbox.get("warm-up"), index.study("warm-up")  # connections open before the start
while not gate.exists():
    time.sleep(0.001)
won = [u for u in (f"2.25.{i}" for i in range(rows)) if outbox.claim(u, name, lease_s=600) is not None]
claimed = [s for s in (f"1.3.{i}" for i in range(studies)) if index.claim_study(s, 1, name, lease_s=600)]
print(json.dumps({"rows": won, "studies": claimed}))
"""


def test_two_processes_racing_claim_each_row_and_study_version_exactly_once(postgres, tmp_path) -> None:
    url, rows, studies = postgres.new_database(), 200, 50
    outbox, index = Outbox(url), StudyIndex(url)
    outbox.put_many([OutboxRow(f"2.25.{i}", "1.2", 1, "b", "R", f"sr/{i}.dcm") for i in range(rows)])
    for i in range(studies):
        index.add_instance(_record(f"1.3.{i}", f"1.3.{i}.1"))
        assert index.mark_queued(f"1.3.{i}", 1, 100.0)
    gate = tmp_path / "go"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_RACER), url, name, str(gate), str(rows), str(studies)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for name in ("worker-a", "worker-b")
    ]
    time.sleep(3)  # both import and connect, then wait at the gate
    gate.touch()
    won = [json.loads(racer.communicate(timeout=120)[0]) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers)
    a, b = won
    assert sorted(a["rows"] + b["rows"]) == sorted(f"2.25.{i}" for i in range(rows)), "each row claimed once"
    assert sorted(a["studies"] + b["studies"]) == sorted(f"1.3.{i}" for i in range(studies)), "each version once"
    owners = {e.sr_uid: e.claimed_by for e in outbox.for_study("1.2")}
    assert all(owners[u] == "worker-a" for u in a["rows"]) and all(owners[u] == "worker-b" for u in b["rows"])
    assert {e.state for e in outbox.for_study("1.2")} == {OutboxState.SENDING}
    assert all(e.attempts == 1 for e in outbox.for_study("1.2"))


def _analyse_job(index: StudyIndex, outbox: Outbox, settings, study_uid: str, runs: list[str]):
    """A job of (study_uid, 1) whose model run is recorded in `runs`, then raises (no model here)."""

    def job(owner: str):
        def engine():
            runs.append(owner)
            raise RuntimeError("the model ran")  # stands for the model: this job runs it, a duplicate must not

        snapshot = read_study(index, settings, study_uid, 1)
        return study_job.run_study(settings, index, outbox, engine, "0.1", snapshot, owner=owner)

    return job


def test_a_duplicate_analyse_job_does_not_run_the_model_twice(postgres, tmp_path) -> None:
    url, settings = postgres.new_database(), load_settings(data_dir=tmp_path / "data")
    index, outbox, runs = StudyIndex(url), Outbox(url), []
    index.add_instance(_record("1.8", "1.8.1"))
    assert index.mark_queued("1.8", 1, 100.0)
    job, owner = _analyse_job(index, outbox, settings, "1.8", runs), job_id("1.8", 1)  # ids are per version
    with StudyIndex(url).analysing("1.8", 1, owner, lease_s=3600) as live:  # a worker is running the job
        assert live and index.study("1.8").state is StudyState.ANALYSING
        assert job(owner).outcome is StudyOutcome.BUSY, "the duplicate (same job id) is turned away"
    assert runs == []
    with pytest.raises(RuntimeError, match="the model ran"):  # that worker died: the redelivered job runs
        job(owner)
    assert runs == [owner]


def test_on_sqlite_a_second_job_waits_for_the_claims_lease(tmp_path) -> None:
    settings, database, runs = load_settings(data_dir=tmp_path / "data"), tmp_path / "index.sqlite", []
    index, outbox = StudyIndex(database), Outbox(database)
    index.add_instance(_record("1.8", "1.8.1"))
    assert index.mark_queued("1.8", 1, 100.0)
    job = _analyse_job(index, outbox, settings, "1.8", runs)
    with pytest.raises(RuntimeError, match="the model ran"):
        job("task-1")
    assert index.study("1.8").state is StudyState.ANALYSING
    assert job("task-2").outcome is StudyOutcome.BUSY, "another job id is turned away while the lease runs"
    with pytest.raises(RuntimeError, match="the model ran"):
        job("task-1")  # the broker redelivers the first job (same task id): it may run again
    assert runs == ["task-1", "task-1"]


def _c_store(port: int, ds, tmp_path: Path) -> int:
    """One C-STORE from a modality (pynetdicom SCU); returns the status the listener answered."""
    ds = pydicom.dcmread(write(ds, tmp_path / f"{ds.SOPInstanceUID}.dcm"))  # with its file meta
    ae = AE(ae_title="CAMERA")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="GROK_PACS")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def test_database_down_answers_a_failure_and_nothing_is_lost_when_it_is_back(tmp_path) -> None:
    from devtools.postgres import Postgres

    server = Postgres(tmp_path / "pg")  # its own server: this test stops it under a running listener
    url = server.new_database()
    settings = load_settings(data_dir=tmp_path / "data", port=free_port(), bind_address="127.0.0.1", database_url=url)
    listener = Listener(settings, StudyIndex(settings.resolved_database_url))
    listener.start()
    patient = Patient()
    first, second = make_cfp(patient, "R", seed=1), make_cfp(patient, "L", seed=2)
    try:
        assert _c_store(settings.port, first, tmp_path) == DimseStatus.SUCCESS
        server.stop()
        assert _c_store(settings.port, second, tmp_path) == DimseStatus.PROCESSING_FAILURE, (
            "no Success without a record"
        )
        server.start()
        assert _c_store(settings.port, second, tmp_path) == DimseStatus.SUCCESS, "the sender's retry is stored"
    finally:
        listener.stop()
        server.stop()
    server.start()
    try:
        stored = {i.sop_uid for i in StudyIndex(url).instances(patient.study_uid)}
    finally:
        server.stop()
    assert stored == {first.SOPInstanceUID, second.SOPInstanceUID}


def test_a_server_database_is_upgraded_by_the_command_only_and_services_refuse_it_before(
    postgres, monkeypatch, capsys
) -> None:
    url = postgres.new_database(upgraded=False)
    monkeypatch.setenv("GROK_PACS_DATABASE_URL", url)
    with pytest.raises(SchemaError, match="run `grok-pacs db upgrade`"):
        StudyIndex(url)
    with pytest.raises(SchemaError, match="has no grok-pacs schema"):
        Outbox(url)
    assert main(["studies"]) == EXIT_USAGE, "a service refuses to start"
    assert "run `grok-pacs db upgrade`" in capsys.readouterr().err
    assert main(["db", "current"]) == EXIT_FAILED
    assert main(["db", "upgrade"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"database schema: empty; this release needs {schema.head()}",
        f"database schema: empty -> {schema.head()}",
    ]
    assert main(["db", "upgrade"]) == 0 and main(["db", "current"]) == 0
    StudyIndex(url).close()


def test_concurrent_upgrades_wait_on_the_advisory_lock(postgres) -> None:
    url = postgres.new_database(upgraded=False)
    engines = [create_engine(url) for _ in range(3)]
    with ThreadPoolExecutor(len(engines)) as pool:
        results = list(pool.map(schema.upgrade, engines))  # without the lock, DDL races and one fails
    assert sorted(results, key=str) == sorted([(None, schema.head())] + [(schema.head(), schema.head())] * 2, key=str)
    for engine in engines:
        engine.dispose()


def test_one_study_over_two_listeners_sharing_a_database_gives_one_job(postgres, tmp_path) -> None:
    from devtools.processes import Redis
    from devtools.sample_dicom import fundus_photograph
    from tests.helpers.ingest_support import drain_jobs, ingest_settings, running, storescu, wait_until

    redis, url = Redis(tmp_path), postgres.new_database()
    shared = {"database_url": url, "broker_url": redis.url, "quiet_period": 0.5}
    first, second = (ingest_settings(tmp_path / name, **shared) for name in ("a", "b"))
    study = pydicom.uid.generate_uid()
    try:
        with running(first) as listener_a, running(second) as listener_b:
            for eye, listener in (("R", listener_a), ("L", listener_b)):  # two associations, two listeners
                path = write(fundus_photograph(study, eye, size=32), tmp_path / f"{eye}.dcm")
                assert storescu(listener.port, path, options=("-xy",)).returncode == 0
            wait_until(lambda: listener_a.index.study(study).state is StudyState.QUEUED, 10, "the study queued")
            time.sleep(1.0)  # both assemblers sweep several times more (every 0.125 s)
            assert listener_a.index.study(study).instance_count == 2
        assert drain_jobs(first, expect=1, timeout=3) == [
            ("grok_pacs.tasks.analyze_study", {"study_uid": study, "version": 1})
        ], "one job, published by one of the two listeners"
    finally:
        redis.stop()


def test_two_sweepers_publishing_slowly_queue_a_quiet_study_once(database) -> None:
    sweepers = [StudyIndex(database), StudyIndex(database)]
    sweepers[0].add_instance(_record("1.4", "1.4.1", received=0.0))
    published: list[tuple[str, int]] = []

    def slow_publish(study, version: int) -> str:
        published.append((study.study_uid, version))
        time.sleep(0.5)  # the other sweeper runs meanwhile: it must skip the study, not publish it again
        return "task"

    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda index: index.queue_quiet(0.0, slow_publish, cutoff=1.0), sweepers))
    assert published == [("1.4", 1)] and sorted(len(run) for run in runs) == [0, 1]
    assert (sweepers[1].study("1.4").state, sweepers[1].study("1.4").version) == (StudyState.QUEUED, 1)


def test_db_upgrade_on_the_embedded_sqlite_file_a_service_made(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("GROK_PACS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("GROK_PACS_DATABASE_URL", raising=False)
    StudyIndex(tmp_path / "data" / "index.sqlite").add_instance(_record("1.1", "1.1.1"))  # the one box ran
    assert main(["db", "upgrade"]) == 0 and main(["db", "upgrade"]) == 0 and main(["db", "current"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"database schema: empty -> {schema.head()}"
    assert StudyIndex(tmp_path / "data" / "index.sqlite").study("1.1").instance_count == 1


def test_the_migrations_build_the_schema_the_code_declares(postgres) -> None:
    """A column added to `db` without its migration would work on SQLite (it adds its own columns) and
    break every PostgreSQL deployment: the upgraded server database must match the tables in `db`."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from grok_pacs.store import db

    engine = create_engine(postgres.new_database())
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), db.metadata) == []
    engine.dispose()


def test_a_command_with_the_database_down_says_so_in_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setenv("GROK_PACS_DATABASE_URL", f"postgresql+psycopg://grok@127.0.0.1:{free_port()}/grok")
    assert main(["studies"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("grok-pacs: database_url: OperationalError:") and "Traceback" not in err
