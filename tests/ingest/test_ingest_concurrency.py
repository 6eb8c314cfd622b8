"""8 concurrent DCMTK associations x 25 instances: nothing lost, everything indexed, one job per study."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from pynetdicom.dsutils import split_dataset

from devtools.sample_dicom import fundus_photograph, write
from grok_pacs.store.index import StudyState
from tests.conftest import require_tool
from tests.helpers.ingest_support import (
    AE,
    DCMTK_ENV,
    drain_jobs,
    ingest_settings,
    running,
    stored_files,
    temp_files,
    wait_until,
)

ASSOCIATIONS, PER_ASSOCIATION, STUDIES = 8, 25, 4


def _body_digest(path: Path) -> str:
    """SHA-256 of the dataset after the file meta (the receiver writes its own file meta)."""
    _meta, offset = split_dataset(path)
    return hashlib.sha256(path.read_bytes()[offset:]).hexdigest()


def test_concurrent_associations_lose_nothing(tmp_path: Path, fast_path: bool) -> None:
    settings = ingest_settings(tmp_path, quiet_period=3.0, pynetdicom_fast_path=fast_path)
    studies = [generate_uid() for _ in range(STUDIES)]
    batches: list[list[Path]] = []
    digests: dict[str, str] = {}
    for number in range(ASSOCIATIONS):
        study = studies[number % STUDIES]  # every study arrives over two associations at once
        series = generate_uid()
        batch = []
        for item in range(PER_ASSOCIATION):
            ds = fundus_photograph(study, "RL"[item % 2], size=32, series_uid=series, seed=item)
            path = write(ds, tmp_path / "src" / f"{number}_{item}.dcm")
            digests[ds.SOPInstanceUID] = _body_digest(path)
            batch.append(path)
        batches.append(batch)
    storescu = require_tool("storescu")
    with running(settings) as service:
        senders = [
            subprocess.Popen(
                [storescu, "-xy", "-aet", f"SCU{n}", "-aec", AE, "127.0.0.1", str(service.port), *map(str, batch)],
                env=DCMTK_ENV,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for n, batch in enumerate(batches)
        ]
        for sender in senders:
            _, err = sender.communicate(timeout=120)
            assert sender.returncode == 0, err
        wait_until(
            lambda: all(service.index.study(s).state is StudyState.QUEUED for s in studies),
            20,
            "every study to be queued",
        )
        indexed = {r.sop_uid: r for s in studies for r in service.index.instances(s)}
        assert {s: service.index.study(s).instance_count for s in studies} == {s: 2 * PER_ASSOCIATION for s in studies}
    files = stored_files(settings)
    assert len(files) == len(indexed) == ASSOCIATIONS * PER_ASSOCIATION
    for sop_uid, record in indexed.items():
        path = settings.data_dir / record.path
        assert _body_digest(path) == digests[sop_uid], "the dataset is stored byte for byte"
        assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == sop_uid
    assert temp_files(settings) == []
    jobs = drain_jobs(settings, expect=STUDIES)
    assert sorted(kwargs["study_uid"] for _, kwargs in jobs) == sorted(studies), "one job per study"
    assert {kwargs["version"] for _, kwargs in jobs} == {1}
