"""No stranded work: lost jobs, database restarts and lost objects all end with the study DONE (or FAILED
with a reason), against real peers.

- the reaper's rules on both dialects (a real PostgreSQL server, the SQLite file): an expired study or result
  lease is queued again once, a live worker's analysis lock is respected;
- Redis killed with -9 right after a study is queued (its job lost): the reaper queues it again, it ends DONE;
- PostgreSQL restarted while a worker analyses a burst: every study ends DONE (0 stranded);
- an instance deleted from SeaweedFS after its upload: the listener puts its copy again, the study ends
  DONE; deleted from the listener's disk too: the study FAILS saying the instance is lost;
- the alert rule in deploy/prometheus/alerts.yml watches the gauge the listener exports.
Leases are seconds here (production: over an hour) so the reaper acts within the test; one worker start
serves the broker, database and object-store cases (starting a worker is most of their time).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select

from devtools.ports import free_port
from devtools.processes import Redis
from devtools.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedFS
from devtools.storescp import StoreSCP
from grok_pacs.config import load_settings
from grok_pacs.ingest.reaper import Reaper
from grok_pacs.ingest.uploader import Uploader
from grok_pacs.jobs import fetch, retry
from grok_pacs.ops import metrics
from grok_pacs.store import leases
from grok_pacs.store.index import StudyIndex, StudyState
from grok_pacs.store.outbox import Outbox, OutboxRow
from grok_pacs.store.storage import open_blob_store
from grok_pacs.store.uploads import Uploads, UploadState
from tests.jobs.test_worker_redis import Box, _arrived_once, many_hosts
from tests.store.test_database import _record

ROOT = Path(__file__).resolve().parents[2]
LEASE = {"reaper_lease_s": 4, "reaper_interval_s": 0.5}  # the reaper acts within seconds
FAST_RETRIES = {"retry_base_s": 0.2, "retry_cap_s": 2, "retry_max_seconds": 30}


class Recorder:
    """A publisher that records what the reaper publishes (the broker side is tested with Redis below)."""

    def __init__(self) -> None:
        self.studies: list[tuple[str, int]] = []
        self.deliveries: list[tuple[str, int]] = []

    def publish(self, study_uid: str, version: int) -> str:
        self.studies.append((study_uid, version))
        return f"analyze-{study_uid}-v{version}"

    def publish_delivery(self, sr_uid: str, retry_number: int) -> None:
        self.deliveries.append((sr_uid, retry_number))


def test_retry_budget_spans_minutes_and_is_bounded() -> None:
    settings = load_settings()
    waits = [retry.nominal_wait_s(settings, n) for n in range(retry.max_retries(settings))]
    assert 300 < sum(waits) <= settings.retry_max_seconds and max(waits) == settings.retry_cap_s
    jittered = [retry.wait_s(settings, 3) for _ in range(50)]
    assert all(4.0 <= wait <= 8.0 for wait in jittered)


def test_reaper_requeues_expired_leases_once_and_respects_a_live_worker(database, tmp_path) -> None:
    lease = {"reaper_lease_s": 0.5, "data_dir": tmp_path / "data"}
    index, recorder = StudyIndex(database), Recorder()
    outbox = Outbox(index.engine)
    reaper = Reaper(load_settings(**lease), index, recorder)
    for study in ("1.41", "1.42", "1.43"):
        index.add_instance(_record(study, f"{study}.1"))
    index.queue_quiet(0, lambda study, version: "job")
    assert index.claim_study("1.42", 1, "job-a", lease_s=3600)  # then its worker died while analysing it
    assert index.set_state("1.43", StudyState.DELIVERING, version=1)  # then its delivery job was lost
    outbox.put_many([OutboxRow("1.43.9", "1.43", 1, "b1", "R", "sr/1.43/1.43.9.dcm")])
    assert reaper.run_once().studies == ()  # leases still running
    time.sleep(0.6)
    expected = ["1.41", "1.42"]
    if not isinstance(database, Path):  # PostgreSQL: a live job's session holds the analysis lock
        with index.engine.connect() as conn:
            conn.execute(select(func.pg_advisory_lock(leases.analyse_lock_key("1.42", 1))))
            assert [item.study_uid for item in reaper.run_once().studies] == ["1.41"]
            conn.execute(select(func.pg_advisory_unlock(leases.analyse_lock_key("1.42", 1))))
            conn.commit()
        expected = ["1.42"]
    done = reaper.run_once()
    assert sorted(item.study_uid for item in done.studies) == expected
    assert sorted(recorder.studies) == [("1.41", 1), ("1.42", 1)]  # each once: a publish starts a new lease
    assert recorder.deliveries == []  # a PENDING result first waits out its retry backoff (300 s by default)
    assert index.study("1.42").state is StudyState.QUEUED and "queued again" in index.study("1.42").detail
    gauge = metrics.REGISTRY.get_sample_value("grok_pacs_oldest_unfinished_study_seconds")
    assert done.oldest_unfinished_s > 0 and gauge == done.oldest_unfinished_s
    quick = Reaper(load_settings(delivery_backoff_max_s=0.1, **lease), index, recorder)
    time.sleep(0.6)
    assert [item.sr_uid for item in quick.run_once().results] == ["1.43.9"]
    assert recorder.deliveries == [("1.43.9", 0)]  # its retry number: the attempts so far
    outbox.close()
    index.close()


@pytest.fixture
def pacs(tmp_path):
    scp = StoreSCP(free_port(), tmp_path / "pacs")
    scp.start()
    yield scp
    scp.stop()


def _delete_object(box: Box, seaweedfs: SeaweedFS, sop_uid: str) -> None:
    """Delete an instance's object from SeaweedFS, behind grok-pacs' back."""
    key = Uploads(box.ingest.index.engine).key(sop_uid)
    location = box.settings.storage_url
    seaweedfs.client().delete_object(Bucket=location.bucket, Key=f"{location.prefix}/{key}")


def test_lost_jobs_a_database_restart_and_lost_objects_strand_no_study(
    request, tmp_path, tiny_bundle, pacs, postgres, seaweedfs
) -> None:
    """One listener (with its reaper) and one worker subprocess on Redis, PostgreSQL and SeaweedFS (one
    worker start serves every case: it is most of the time)."""
    redis = Redis(tmp_path)
    shared = {**many_hosts(request, tmp_path), **LEASE, **FAST_RETRIES}
    box = Box(tmp_path, tiny_bundle, redis, f"PACS@127.0.0.1:{pacs.port}", shared)
    restarted = None
    try:
        lost_job = box.send_study("R")
        box.wait_state(lost_job, (StudyState.QUEUED,), 30)
        redis.proc.send_signal(signal.SIGKILL)  # no persistence: the queued job is gone with it
        redis.proc.wait(10)
        restarted = Redis(tmp_path, port=redis.port)  # empty, as after a crash without persistence
        # Objects lost from the store while their studies wait for a worker: one still on the listener's disk.
        reuploaded, lost = box.send_study("R"), box.send_study("R")
        for study_uid in (reuploaded, lost):
            box.wait_state(study_uid, (StudyState.QUEUED,), 30)
        _delete_object(box, seaweedfs, box.ingest.index.instances(reuploaded)[0].sop_uid)
        gone = box.ingest.index.instances(lost)[0]
        _delete_object(box, seaweedfs, gone.sop_uid)
        (box.settings.data_dir / gone.path).unlink()

        box.worker()
        for study_uid in (lost_job, reuploaded):
            assert box.wait_state(study_uid, (StudyState.DONE, StudyState.FAILED), 60).state is StudyState.DONE
        failed = box.wait_state(lost, (StudyState.DONE, StudyState.FAILED), 30)
        assert failed.state is StudyState.FAILED and f"instance {gone.sop_uid} is lost" in failed.detail

        burst = [box.send_study("R") for _ in range(2)]
        box.wait_state(burst[0], (StudyState.ANALYSING, StudyState.DELIVERING, StudyState.DONE), 60)
        postgres.stop()  # fast shutdown: every session of the listener and the worker is cut
        time.sleep(1.0)
        postgres.start()
        ends = [box.wait_state(uid, (StudyState.DONE, StudyState.FAILED), 90) for uid in burst]
        assert [end.state for end in ends] == [StudyState.DONE] * 2, [end.detail for end in ends]

        delivered = [lost_job, reuploaded, *burst]
        results = sorted(e.sr_uid for uid in delivered for e in box.outbox(uid))
        assert len(results) == 2 * len(delivered)  # an SR and the PDF report per study
        assert _arrived_once(pacs, len(results), settle_s=1.0) == results  # each once
    finally:
        box.close()
        for server in (restarted, redis):
            if server is not None:
                server.stop()


def test_a_corrupt_object_is_replaced_from_the_listeners_copy(tmp_path: Path, seaweedfs: SeaweedFS) -> None:
    """Same key, other bytes (corrupted out of band): a worker's fetch refuses it and asks for the instance
    again; the listener's uploader writes its copy over the corrupt object; the next fetch is verified."""
    settings = load_settings(
        data_dir=tmp_path / "data",
        storage_url=f"s3://{BUCKET}/corrupt-{tmp_path.name}",
        storage_endpoint=seaweedfs.endpoint,
        storage_access_key=ACCESS_KEY,
        storage_secret_key=SECRET_KEY,
    )
    index = StudyIndex(settings.resolved_database_url)
    uploads, store = Uploads(index.engine), open_blob_store(settings)
    rec = _record("1.51", "1.51.1")
    (settings.data_dir / rec.path).parent.mkdir(parents=True)
    (settings.data_dir / rec.path).write_bytes(b"DICM instance bytes")
    index.add_instance(rec)
    uploader = Uploader(settings.data_dir, uploads, store)
    assert uploader.run_once().uploaded == 1
    key = f"{settings.storage_url.prefix}/{uploads.key(rec.sop_uid)}"
    seaweedfs.client().put_object(Bucket=BUCKET, Key=key, Body=b"DICM instance bytez")  # same size
    scratch = settings.data_dir / "scratch" / "job"
    with pytest.raises(retry.InstanceReuploading):
        fetch._fetch(settings, uploads, store, rec, scratch)
    assert uploads.state(rec.sop_uid) is UploadState.REUPLOAD
    assert uploader.run_once().uploaded == 1
    copy = settings.data_dir / fetch._fetch(settings, uploads, store, rec, scratch).path
    assert copy.read_bytes() == b"DICM instance bytes" and uploads.state(rec.sop_uid) is UploadState.UPLOADED
    store.close()
    index.close()


def test_the_alert_rule_watches_the_exported_oldest_unfinished_gauge() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert set(rules) == {"groups"}
    for group in rules["groups"]:
        assert isinstance(group["name"], str) and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"} and rule["alert"] and rule["expr"]
    stranded = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}["GrokPacsStrandedWork"]
    assert "grok_pacs_oldest_unfinished_study_seconds" in stranded["expr"]
    exported = {metric.name for metric in metrics.REGISTRY.collect()}
    assert "grok_pacs_oldest_unfinished_study_seconds" in exported
