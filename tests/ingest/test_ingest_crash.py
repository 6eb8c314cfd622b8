"""kill -9 of `grok-pacs listen` in the middle of a transfer, then restart: nothing acknowledged is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE

from devtools.ports import wait_for_port
from devtools.sample_dicom import fundus_photograph, oct_tomography, write
from grok_pacs.store.index import StudyIndex, StudyState
from tests.conftest import require_tool
from tests.helpers.ingest_support import (
    AE as AE_TITLE,
)
from tests.helpers.ingest_support import (
    DCMTK_ENV,
    StallingRelay,
    drain_jobs,
    ingest_settings,
    stored_files,
    storescu,
    temp_files,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
QUIET = 8.0  # longer than kill + restart + resend, so the interrupted study is queued once, complete


def _listen(settings, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "GROK_PACS_DATA_DIR": str(settings.data_dir),
        "GROK_PACS_PORT": str(settings.port),
        "GROK_PACS_BIND_ADDRESS": "127.0.0.1",
        "GROK_PACS_QUIET_PERIOD": str(QUIET),
        "GROK_PACS_MIN_FREE_DISK_MB": "1",
        "GROK_PACS_PYNETDICOM_FAST_PATH": str(settings.pynetdicom_fast_path),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "grok_pacs.cli", "listen"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )
    wait_for_port(settings.port, timeout=60)
    return process


def test_kill_9_during_transfer_then_restart(tmp_path: Path, fast_path: bool) -> None:
    settings = ingest_settings(tmp_path, quiet_period=QUIET, pynetdicom_fast_path=fast_path)
    study = generate_uid()
    early = [
        write(fundus_photograph(study, "RL"[n % 2], size=64, seed=n), tmp_path / f"early{n}.dcm") for n in range(5)
    ]
    big = write(oct_tomography(study, "R", frames=64, rows=128, columns=256), tmp_path / "big.dcm")  # 2 MB
    late = [write(fundus_photograph(study, "L", size=64, seed=9), tmp_path / "late.dcm")]
    log = tmp_path / "listen.log"
    listener = _listen(settings, log)
    try:
        done = storescu(settings.port, *early, options=("-xy",))
        assert done.returncode == 0, done.stderr  # every one of these got Success
        relay = StallingRelay(settings.port, limit=big.stat().st_size // 2)
        sender = subprocess.Popen(
            [require_tool("storescu"), "-aet", "TESTSCU", "-aec", AE_TITLE, "127.0.0.1", str(relay.port), str(big)],
            env=DCMTK_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        wait_until(
            lambda: any(p.stat().st_size > 512 * 1024 for p in temp_files(settings)),
            30,
            "the big instance to be half written",
        )
        listener.send_signal(signal.SIGKILL)
        listener.wait(timeout=30)
        sender.communicate(timeout=60)
        assert sender.returncode != 0, "the interrupted instance was never acknowledged"
        relay.close()
        assert temp_files(settings), "the kill left a partial temporary file"

        listener = _listen(settings, log)
        assert temp_files(settings) == [], "recovery removed the partial temporary file"
        index = StudyIndex(settings.index_path)
        acknowledged = {pydicom.dcmread(p).SOPInstanceUID for p in early}
        assert {r.sop_uid for r in index.instances(study)} == acknowledged
        for record in index.instances(study):
            ds = pydicom.dcmread(settings.data_dir / record.path)
            assert ds.pixel_array.shape == (64, 64, 3), "every acknowledged instance is readable"
        # The sender retries what failed, plus the rest of the study.
        done = storescu(settings.port, big, *late, options=("-xy",))
        assert done.returncode == 0, done.stderr
        wait_until(lambda: index.study(study).state is StudyState.QUEUED, QUIET + 20, "the study to be queued")
        assert index.study(study).instance_count == len(early) + 2
        assert len(stored_files(settings)) == len(early) + 2
        index.close()
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=30)
    assert listener.returncode == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "association released: calling=TESTSCU called=GROK_PACS" in text and f"study queued: study={study}" in text
    assert "stored=5" in text and "bytes=" in text
    assert "PHANTOM" not in text, "no patient attributes in the logs"
    jobs = drain_jobs(settings, expect=1)
    assert jobs == [("grok_pacs.tasks.analyze_study", {"study_uid": study, "version": 1})], "queued once, complete"


BURST_ASSOCIATIONS, BURST_PER_ASSOCIATION, KILL_AFTER = 4, 12, 20


def _send_until_killed(port: int, datasets: list, acknowledged: list[str], kill: Callable[[], None]) -> None:
    """One association sending `datasets` in turn; every Success is recorded, the KILL_AFTER-th kills."""
    ae = AE(ae_title="BURSTSCU")
    ae.add_requested_context(datasets[0].SOPClassUID, [datasets[0].file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    for ds in datasets:
        status = assoc.send_c_store(ds) if assoc.is_established else None
        if status is None or "Status" not in status:
            return  # the listener is gone: this instance was never acknowledged
        assert status.Status == 0x0000
        acknowledged.append(ds.SOPInstanceUID)
        if len(acknowledged) == KILL_AFTER:
            kill()
    assoc.release()


def test_kill_9_right_after_a_burst_of_successes(tmp_path: Path, fast_path: bool) -> None:
    """Concurrent associations; SIGKILL at once after the 20th Success: every acknowledged instance is
    present, whole (byte for byte) and indexed after the restart (group commit acknowledges nothing early)."""
    settings = ingest_settings(tmp_path, quiet_period=QUIET, pynetdicom_fast_path=fast_path)
    study = generate_uid()
    batches = [
        [
            fundus_photograph(study, "RL"[n % 2], size=48, series_uid=series, seed=i)
            for i in range(BURST_PER_ASSOCIATION)
        ]
        for n, series in enumerate(generate_uid() for _ in range(BURST_ASSOCIATIONS))
    ]
    sent = {ds.SOPInstanceUID: ds for batch in batches for ds in batch}
    log = tmp_path / "listen.log"
    listener = _listen(settings, log)
    acknowledged: list[str] = []
    kill = lambda: listener.send_signal(signal.SIGKILL)  # noqa: E731
    threads = [
        threading.Thread(target=_send_until_killed, args=(settings.port, batch, acknowledged, kill))
        for batch in batches
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    listener.wait(timeout=30)
    assert listener.returncode == -signal.SIGKILL, "killed before every instance was sent"
    assert KILL_AFTER <= len(acknowledged) < len(sent)

    listener = _listen(settings, log)
    try:
        index = StudyIndex(settings.index_path)
        indexed = {record.sop_uid: record for record in index.instances(study)}
        assert set(acknowledged) <= set(indexed), "every acknowledged instance is indexed"
        for sop_uid in acknowledged:
            stored = pydicom.dcmread(settings.data_dir / indexed[sop_uid].path)
            assert stored.PixelData == sent[sop_uid].PixelData, "whole, byte for byte"
            assert stored.SOPInstanceUID == sop_uid
        assert index.study(study).instance_count == len(indexed) == len(stored_files(settings))
        assert temp_files(settings) == []
        index.close()
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=30)
