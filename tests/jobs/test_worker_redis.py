"""A separate `grok-pacs worker` process on a Redis broker, a study sent by DCMTK storescu to the listener.

- the worker killed with SIGKILL mid-job: Redis redelivers the unacknowledged job to a new worker and
  exactly one SR arrives; SIGTERM mid-job: the job finishes, then the worker exits 0;
- the PACS down, then up: the SR arrives once (delivery retried with backoff), also when the worker is
  killed while the SR waits in the outbox;
- a permanent rejection: the study FAILS with the reason after one attempt, no retry loop;
- `grok-pacs withdraw` while the PACS is down, the worker killed with the rejection note in the outbox: the
  note arrives once when the PACS is back and a worker starts (many hosts: the command on the listener's
  host, the note through the object store to a worker with a data directory of its own).
The SIGKILL cases also run in the many-hosts layout (issue 17): PostgreSQL and SeaweedFS shared, every
worker with its own empty data directory, so the second worker finds the study and the SR only there.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools.ports import free_port
from devtools.processes import GrokProcess, Redis, grok_env, storescu, wait_until
from devtools.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY
from devtools.storescp import StoreSCP
from grok_pacs.config import load_settings
from grok_pacs.ingest.listener import Listener
from grok_pacs.ingest.service import IngestService
from grok_pacs.jobs.publisher import JobPublisher
from grok_pacs.store.index import StudyIndex, StudyState
from grok_pacs.store.outbox import Outbox, OutboxState, ResultKind
from tests.helpers.ophthalmic_dicom import Patient, make_cfp, make_oct, write

JOB_TIME_LIMIT_S = 10  # -> Redis visibility timeout 20 s: a killed worker's job comes back within ~21 s
READY = "worker ready"


@pytest.fixture
def redis(tmp_path):
    server = Redis(tmp_path)
    yield server
    server.stop()


class Box:
    """Listener (in-process, publishing to Redis) + worker subprocesses: one-box, sharing one data directory;
    many-hosts (`shared` names a database and an object store), each with a data directory of its own."""

    def __init__(
        self, tmp_path: Path, bundle: Path, redis: Redis, destination: str, shared: dict | None = None
    ) -> None:
        shared = shared or {}
        self.tmp_path, self.shared = tmp_path, shared
        self.values = dict(
            data_dir=tmp_path / "data",
            broker_url=redis.url,
            bundle=bundle,
            destination=destination,
            quiet_period=0.5,
            job_time_limit=JOB_TIME_LIMIT_S,
            delivery_backoff_s=1,
            delivery_max_retries=8,
            dimse_timeout=10,
            acse_timeout=10,
            network_timeout=10,
            **shared,
        )
        self.settings = load_settings(**self.values, port=free_port(), bind_address="127.0.0.1")
        self.ingest = IngestService(self.settings, JobPublisher(self.settings))
        self.ingest.start()
        self.workers: list[GrokProcess] = []

    def worker(self) -> GrokProcess:
        name = f"worker{len(self.workers)}"
        values = {**self.values, "data_dir": self.tmp_path / name} if self.shared else self.values
        proc = GrokProcess(["worker"], grok_env(**values), self.tmp_path / f"{name}.log")
        self.workers.append(proc)
        proc.wait_ready(READY)
        return proc

    def send_study(self, eyes: str = "R") -> str:
        patient = Patient()
        files = []
        for eye in eyes:
            for ds in (make_cfp(patient, eye), make_oct(patient, eye)):
                files.append(write(ds, self.tmp_path / "study" / f"{ds.SOPInstanceUID}.dcm"))
        storescu(self.ingest.port, files)
        return patient.study_uid

    def study(self, study_uid: str):
        index = StudyIndex(self.settings.resolved_database_url)
        try:
            return index.study(study_uid)
        finally:
            index.close()

    def wait_state(self, study_uid: str, states: tuple[StudyState, ...], timeout: float):
        return wait_until(
            lambda: (s := self.study(study_uid)) is not None and s.state in states and s,
            timeout,
            f"study {study_uid} in {states}",
            interval=0.02,
        )

    def outbox(self, study_uid: str):
        return Outbox(self.settings.resolved_database_url).for_study(study_uid)

    def close(self) -> None:
        for proc in self.workers:
            proc.stop()
        self.ingest.stop()


@pytest.fixture
def pacs(tmp_path):
    scp = StoreSCP(free_port(), tmp_path / "pacs")
    yield scp
    scp.stop()


def many_hosts(request: pytest.FixtureRequest, tmp_path: Path) -> dict:
    """A fresh PostgreSQL database and an object-store prefix, shared by the listener and every worker."""
    store = request.getfixturevalue("seaweedfs")
    return dict(
        database_url=request.getfixturevalue("postgres").new_database(),
        storage_url=f"s3://{BUCKET}/worker-redis-{tmp_path.name}",
        storage_endpoint=store.endpoint,
        storage_access_key=ACCESS_KEY,
        storage_secret_key=SECRET_KEY,
    )


@pytest.fixture
def box(request, tmp_path, tiny_bundle, redis, pacs):
    """The one-box layout, or many-hosts when a test asks for it (`parametrize("box", ..., indirect=True)`)."""
    shared = many_hosts(request, tmp_path) if getattr(request, "param", "one-box") == "many-hosts" else {}
    instance = Box(tmp_path, tiny_bundle, redis, f"PACS@127.0.0.1:{pacs.port}", shared)
    yield instance
    instance.close()


def _arrived_once(pacs: StoreSCP, count: int = 2, settle_s: float = 3.0) -> list[str]:
    """The SOP Instance UIDs received, sorted, once `count` arrived (an eye's SR and the study's PDF)."""
    wait_until(lambda: len(pacs.received_sop_uids()) >= count, 90, f"{count} results at the PACS", interval=0.2)
    time.sleep(settle_s)  # a duplicate would arrive in this time
    return sorted(pacs.received_sop_uids())


def _results(box: Box, study_uid: str, count: int = 2) -> list:
    """The study's outbox rows: one SR per eye and the PDF report."""
    entries = box.outbox(study_uid)
    assert sorted(e.kind for e in entries) == sorted([ResultKind.PDF] + [ResultKind.SR] * (count - 1))
    return entries


@pytest.mark.parametrize("box", ["one-box", "many-hosts"], indirect=True)
def test_sigkill_mid_job_redelivers_and_one_sr_arrives(box, pacs):
    pacs.start()
    first = box.worker()
    study_uid = box.send_study("R")
    box.wait_state(study_uid, (StudyState.ANALYSING,), 60)  # the worker is loading the model / analysing
    first.signal(signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    assert pacs.received_sop_uids() == []  # killed before delivering
    box.worker()
    uids = _arrived_once(pacs)
    assert uids == sorted(e.sr_uid for e in _results(box, study_uid))  # the SR and the PDF, each once
    assert box.wait_state(study_uid, (StudyState.DONE,), 20).state is StudyState.DONE


def test_sigterm_mid_job_finishes_the_job_then_exits(box, pacs):
    pacs.start()
    proc = box.worker()
    study_uid = box.send_study("RL")
    box.wait_state(study_uid, (StudyState.ANALYSING,), 60)
    proc.signal(signal.SIGTERM)
    assert proc.wait(120) == 0
    assert len(pacs.received_srs()) == 2  # both eyes' SRs, delivered before the exit
    assert len(pacs.received_pdfs()) == 1 and len(pacs.received_sop_uids()) == 3  # and the PDF report
    assert box.study(study_uid).state is StudyState.DONE


def test_pacs_down_then_up_sr_arrives_once(box, pacs):
    box.worker()
    study_uid = box.send_study("R")
    waiting = box.wait_state(study_uid, (StudyState.DELIVERING,), 90)
    entries = wait_until(
        lambda: (
            len(es := [e for e in box.outbox(study_uid) if e.attempts >= 2 and e.state is OutboxState.PENDING]) == 2
            and es
        ),
        30,
        "retried deliveries (SR and PDF) waiting for their next attempt",
        interval=0.02,
    )
    assert all(e.last_error.startswith("transient") for e in entries)
    assert "waiting for PACS@" in (box.study(study_uid).detail or waiting.detail)
    pacs.start()
    assert _arrived_once(pacs) == sorted(e.sr_uid for e in _results(box, study_uid))
    assert box.wait_state(study_uid, (StudyState.DONE,), 20).state is StudyState.DONE


@pytest.mark.parametrize("box", ["one-box", "many-hosts"], indirect=True)
def test_undelivered_sr_survives_a_worker_restart(box, pacs):
    first = box.worker()
    study_uid = box.send_study("R")
    wait_until(
        lambda: [e for e in box.outbox(study_uid) if e.attempts >= 1 and e.state is OutboxState.PENDING],
        90,
        "a failed first delivery",
        interval=0.02,
    )
    first.signal(signal.SIGKILL)  # the host goes down with the SR still in the outbox
    first.wait(10)
    pacs.start()
    box.worker()  # at start it queues every undelivered SR of the outbox
    assert _arrived_once(pacs) == sorted(e.sr_uid for e in _results(box, study_uid))
    assert box.wait_state(study_uid, (StudyState.DONE,), 30).state is StudyState.DONE


def test_permanent_rejection_fails_without_retry_loop(tmp_path, tiny_bundle, redis):
    pacs_settings = load_settings(
        data_dir=tmp_path / "pacs",
        port=free_port(),
        bind_address="127.0.0.1",
        ae_title="PACS",
        allowed_aes=["SOMEONE_ELSE"],
    )
    rejecting = Listener(pacs_settings, StudyIndex(pacs_settings.index_path))
    rejecting.start()
    box = Box(tmp_path, tiny_bundle, redis, f"PACS@127.0.0.1:{pacs_settings.port}")
    try:
        box.worker()
        study_uid = box.send_study("R")
        failed = box.wait_state(study_uid, (StudyState.FAILED,), 90)
        assert "Calling AE title not recognised" in failed.detail
        time.sleep(4)  # backoff would have retried (1 s, 2 s) by now
        for entry in _results(box, study_uid):
            assert (entry.state, entry.attempts) == (OutboxState.FAILED, 1)
    finally:
        box.close()
        rejecting.stop()


@pytest.mark.parametrize("box", ["many-hosts"], indirect=True)  # one box: tests/jobs/test_replace_withdraw.py
def test_a_withdrawal_arrives_once_through_a_pacs_outage_and_a_kill(box, pacs):
    pacs.start()
    first = box.worker()
    study_uid = box.send_study("R")
    box.wait_state(study_uid, (StudyState.DONE,), 90)
    delivered = _arrived_once(pacs, settle_s=0)  # the SR and the PDF
    pacs.stop()
    withdraw = [sys.executable, "-m", "grok_pacs.cli.main", "withdraw", study_uid, "--reason", "quality"]
    done = subprocess.run(withdraw, env=grok_env(**box.values), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    note_uid = done.stdout.split("rejection note ")[1].split()[0]
    wait_until(  # the command published the note's delivery; the worker tried it and waits to retry
        lambda: [
            e
            for e in box.outbox(study_uid)
            if e.sr_uid == note_uid and e.attempts >= 1 and e.state is OutboxState.PENDING
        ],
        60,
        "a failed first delivery of the rejection note",
        interval=0.02,
    )
    first.signal(signal.SIGKILL)
    first.wait(10)
    pacs.start()
    box.worker()  # at start it queues every undelivered result of the outbox, the note included
    assert _arrived_once(pacs, count=3) == sorted([*delivered, note_uid])
    (note,) = [ds for ds in pacs.received() if ds.SOPInstanceUID == note_uid]
    assert note.ConceptNameCodeSequence[0].CodeValue == "113001"
    assert box.wait_state(study_uid, (StudyState.DONE,), 30).state is StudyState.DONE
