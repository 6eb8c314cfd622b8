"""Disk-full benchmark: a real 24 MiB tmpfs as the listener's data directory, filled by C-STOREs until it is full.

66 OCT instances (16 frames of 128 or 256 square) go over one association to a listener whose free-space
watermark and reserve are off (`min_free_disk_mb` = `transfer_reserve_mb` = 0, so the disk really fills while
instances stream in), with the fast path and without. Counted: acknowledged, stored files, indexed rows,
refusals by status and cause, temporary files left. The guarantee: acknowledged = stored = indexed, no
partial file. Needs root (mount). Writes bench/results/disk_full.json.

Run: `.venv/bin/python -m bench.disk_full`.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from pydicom.uid import generate_uid

from devtools.ports import free_port
from devtools.sample_dicom import oct_tomography, write
from grok_pacs.config import Peer, load_settings
from grok_pacs.dicom.scu import store_files
from grok_pacs.ingest.service import IngestService
from grok_pacs.jobs.publisher import JobPublisher

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "disk_full.json"
INSTANCES = 66
DISK_MB = 24


def _instances(directory: Path) -> list[Path]:
    study = generate_uid()
    return [
        write(
            oct_tomography(study, "R", frames=16, rows=256 if i % 3 == 0 else 128, columns=256 if i % 3 == 0 else 128),
            directory / f"{i}.dcm",
        )
        for i in range(INSTANCES)
    ]


def fill(fast_path: bool, scratch: Path, sources: list[Path]) -> dict:
    disk = scratch / f"disk-{fast_path}"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(disk)], check=True)
    try:
        settings = load_settings(
            data_dir=disk / "data",
            port=free_port(),
            bind_address="127.0.0.1",
            min_free_disk_mb=0,
            transfer_reserve_mb=0,
            quiet_period=300,
            pynetdicom_fast_path=fast_path,
        )
        service = IngestService(settings, JobPublisher(settings))
        service.start()
        try:
            results = store_files(
                Peer(ae_title=settings.ae_title, host="127.0.0.1", port=settings.port), sources, "BENCH", 30
            )
            study = {r.study_uid for r in service.index.studies()}
            indexed = sum(len(service.index.instances(uid)) for uid in study)
        finally:
            service.stop()
        data = settings.data_dir
        refused = [r for r in results if not r.ok]
        return {
            "fast_path": fast_path,
            "sent": len(results),
            "acknowledged": sum(r.ok for r in results),
            "stored_files": sum(1 for p in (data / "incoming").rglob("*.dcm")),
            "indexed": indexed,
            "refused": len(refused),
            "refused_statuses": sorted({f"0x{r.status:04X}" for r in refused}),
            "refused_disk_full_mid_transfer": sum("No space" in r.message for r in refused),
            "refused_by_free_space_check": sum("No space" not in r.message for r in refused),
            "partial_files_in_tmp": sum(1 for p in (data / "tmp").rglob("*") if p.is_file()),
        }
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="grok-disk-full-") as tmp:
        scratch = Path(tmp)
        sources = _instances(scratch / "sources")
        result = {"disk_mb": DISK_MB, "runs": [fill(fast, scratch, sources) for fast in (True, False)]}
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
