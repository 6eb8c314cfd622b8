"""Jobs reach real brokers: the embedded SQLite broker (consumed by a real Celery worker) and Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from devtools.ports import free_port
from devtools.processes import Redis
from devtools.sample_dicom import fundus_photograph, write
from grok_pacs.store.index import StudyState
from tests.helpers.ingest_support import drain_jobs, ingest_settings, running, storescu, wait_until

ROOT = Path(__file__).resolve().parents[2]  # the worker runs here: `python -m` puts it on sys.path, for the stub


def _send_study(tmp_path: Path, port: int) -> str:
    study = generate_uid()
    paths = [write(fundus_photograph(study, eye, size=32), tmp_path / f"{eye}.dcm") for eye in "RL"]
    done = storescu(port, *paths, options=("-xy",))
    assert done.returncode == 0, done.stderr
    return study


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    redis = Redis(tmp_path)
    yield redis.port
    redis.stop()


def test_embedded_broker_job_is_consumed_by_a_celery_worker(tmp_path: Path) -> None:
    settings = ingest_settings(tmp_path)
    with running(settings) as service:
        study = _send_study(tmp_path, service.port)
        wait_until(lambda: service.index.study(study).state is StudyState.QUEUED, 10, "the study to be queued")
    job_log = tmp_path / "jobs.jsonl"
    env = {**os.environ, "GROK_PACS_DATA_DIR": str(settings.data_dir), "GROK_TEST_JOB_LOG": str(job_log)}
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.helpers.ingest_celery_stub",
            "worker",
            "--pool=solo",
            "-Q",
            settings.queue,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "WARNING",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(job_log.is_file, 60, "the worker to run the job", step=0.2)
    finally:
        worker.send_signal(signal.SIGTERM)
        _, errors = worker.communicate(timeout=60)
    assert [json.loads(line) for line in job_log.read_text().splitlines()] == [{"study_uid": study, "version": 1}], (
        errors
    )
    assert drain_jobs(settings, expect=0, timeout=2) == [], "the worker took the job off the queue"


def test_job_reaches_redis(tmp_path: Path, redis_port: int) -> None:
    settings = ingest_settings(tmp_path, broker_url=f"redis://127.0.0.1:{redis_port}/0")
    with running(settings) as service:
        study = _send_study(tmp_path, service.port)
        wait_until(lambda: service.index.study(study).state is StudyState.QUEUED, 10, "the study to be queued")
    assert drain_jobs(settings, expect=1) == [("grok_pacs.tasks.analyze_study", {"study_uid": study, "version": 1})]


def test_broker_outage_delays_the_job_but_does_not_lose_it(tmp_path: Path) -> None:
    port = free_port()
    settings = ingest_settings(tmp_path, broker_url=f"redis://127.0.0.1:{port}/0")
    with running(settings) as service:
        study = _send_study(tmp_path, service.port)
        wait_until(lambda: service.assembler.failed_passes > 0, 30, "a failed publish")
        assert service.index.study(study).state is StudyState.RECEIVING
        redis = Redis(tmp_path, port=port)
        try:
            wait_until(lambda: service.index.study(study).state is StudyState.QUEUED, 30, "the study to be queued")
            assert drain_jobs(settings, expect=1) == [
                ("grok_pacs.tasks.analyze_study", {"study_uid": study, "version": 1})
            ]
        finally:
            redis.stop()
