"""A data directory that fills up for real (a 24 MiB tmpfs) while a PACS sends: every instance answered
Success is stored and indexed, every other one is refused with 0xA700 and a reason, the association goes
on, and no partial file is left behind."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from devtools.ports import free_port
from devtools.sample_dicom import oct_tomography, write
from devtools.storescp import StoreSCP
from grok_pacs.config import Peer, load_settings
from grok_pacs.dicom.scu import store_files
from grok_pacs.dicom.status import DimseStatus
from grok_pacs.dicom.uids import instance_relpath
from grok_pacs.ingest.assembly import recover
from grok_pacs.jobs import worker
from grok_pacs.jobs.tasks import analyze_study
from grok_pacs.store.files import DiskFullError
from grok_pacs.store.index import StudyState
from tests.helpers.ingest_support import AE as OUR_AE
from tests.helpers.ingest_support import ingest_settings, running, stored_files, temp_files
from tests.helpers.ophthalmic_dicom import Patient, make_cfp

DISK_MB = 24
# 1 MiB and 256 KiB instances, one large then two small (33 MiB in all): once free space is below 1 MiB
# the small ones still fit, and the next large one runs out of space while it streams in.
INSTANCES = 66


def _size(i: int) -> int:
    return 256 if i % 3 == 0 else 128


def mount_tmpfs(directory: Path, size_mb: int) -> None:
    """A real, small filesystem at `directory` (needs root: the test fails, never skips, without it)."""
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(directory)], capture_output=True, text=True
    )
    assert done.returncode == 0, f"cannot mount a {size_mb} MiB tmpfs at {directory}: {done.stderr.strip()}"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    mount_tmpfs(disk, DISK_MB)
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_disk_filling_mid_transfer_refuses_with_a700_and_loses_nothing(
    small_disk: Path, tmp_path: Path, fast_path: bool
) -> None:
    study = generate_uid()
    sources = [
        write(
            oct_tomography(study, "R", frames=16, rows=_size(i), columns=_size(i), seed=i),
            tmp_path / "src" / f"{i}.dcm",
        )
        for i in range(INSTANCES)
    ]
    # No reserve (min_free_disk_mb=0, transfer_reserve_mb=0): the free-space checks before and after the
    # transfer do not refuse first, so the disk really fills while an instance streams in; a long quiet
    # period keeps assembly out of the way.
    settings = ingest_settings(
        tmp_path,
        data_dir=small_disk / "data",
        min_free_disk_mb=0,
        transfer_reserve_mb=0,
        quiet_period=300,
        pynetdicom_fast_path=fast_path,
    )
    peer = Peer(ae_title=OUR_AE, host="127.0.0.1", port=settings.port)
    with running(settings) as service:
        results = store_files(peer, sources, calling_ae="TESTSCU", timeout=30)  # one association
        indexed = {record.sop_uid for record in service.index.instances(study)}
    stored = [r for r in results if r.ok]
    refused = [r for r in results if not r.ok]
    assert len(results) == INSTANCES
    assert 5 < len(stored) < INSTANCES, f"the disk must fill part-way through: {len(stored)} stored"
    # Every refusal is a status on the same association (none aborted, none unanswered), with a reason;
    # at least one came from the disk filling while the instance streamed in.
    assert {r.status for r in refused} == {DimseStatus.REFUSED_OUT_OF_RESOURCES}, [
        (r.status, r.message) for r in refused
    ]
    assert all(r.message for r in refused)
    assert any("No space left on device" in r.message for r in refused), [r.message for r in refused]
    # Acknowledged == stored == indexed, each file whole; nothing partial anywhere.
    assert {r.sop_instance_uid for r in stored} == indexed
    on_disk = {p.stem: p for p in stored_files(settings)}
    assert set(on_disk) == indexed
    for result in stored:
        assert dcmread(on_disk[result.sop_instance_uid]).PixelData == dcmread(result.path).PixelData
    assert temp_files(settings) == []


def _fill(directory: Path) -> Path:
    """Write a file in `directory` until the filesystem is full; returns it (delete it to free the space)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle:
        chunk = b"\0" * (1 << 20)
        try:
            while True:
                handle.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    with open(filler, "ab", buffering=0) as handle:  # the last partial MiB: byte pages until nothing fits
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def test_worker_full_disk_while_writing_results_waits_and_retries(
    small_disk: Path, tmp_path: Path, tiny_bundle
) -> None:
    """The worker's data directory fills up: the job is retried later (not FAILED), the study says why, and
    once space is back the same job delivers."""
    pacs = StoreSCP(free_port(), tmp_path / "pacs").start()
    settings = load_settings(
        data_dir=small_disk / "data",
        database_url=f"sqlite:///{tmp_path / 'index.sqlite'}",  # the database is not on the full disk
        bundle=tiny_bundle,
        quiet_period=0,
        destination=f"PACS@127.0.0.1:{pacs.port}",
        dimse_timeout=20,
    )
    app = worker.worker_app(settings)
    try:
        ctx = worker.context_of(app)
        ds = make_cfp(Patient(), "R")
        data_dir = settings.data_dir
        write(ds, data_dir / instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
        recover(settings, ctx.index)
        study_uid = str(ds.StudyInstanceUID)
        assert ctx.index.mark_queued(study_uid, 1, ctx.index.study(study_uid).last_received_at)
        filler = _fill(small_disk)
        with pytest.raises(DiskFullError):  # called directly, a Celery retry raises the error itself
            analyze_study(study_uid=study_uid, version=1)
        study = ctx.index.study(study_uid)
        assert study.state is StudyState.QUEUED and study.detail.startswith("waiting for disk space"), study
        assert not (data_dir / "sr").exists() or not any(p.is_file() for p in (data_dir / "sr").rglob("*"))
        assert list((data_dir / "tmp").iterdir()) == []
        filler.unlink()
        summary = analyze_study(study_uid=study_uid, version=1)  # the retry, once space is back
        assert list(summary["srs"].values()) == ["delivered"], summary
        assert ctx.index.study(study_uid).state is StudyState.DONE
        assert len(pacs.received_srs()) == 1
    finally:
        app.close()
        pacs.stop()
