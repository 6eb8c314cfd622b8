"""Upload-step benchmark: what the object store adds between a study's last C-STORE Success and its job.

One listener (grok_pacs.ingest.service in this process, embedded SQLite index and broker) per layout:
`one-box` (no storage_url: a study is complete after the quiet period) and `object-store` (SeaweedFS on
loopback: a study is complete once quiet AND all its instances are uploaded). Each study is sent by one
DCMTK storescu (one association); the clock starts when storescu returns (every Success received) and
stops when the index shows the study QUEUED. Both layouts include the quiet period (QUIET_S); the
difference of the medians is the upload step's overhead. Workloads: 2 OP photographs of ~300 KB per
study, and the same plus one 32 MB OPT volume. Writes bench/results/upload.json with the load average
(2 cores shared with other work: noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pydicom.uid import generate_uid

from devtools.ports import free_port
from devtools.sample_dicom import fundus_photograph, oct_tomography, write
from devtools.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedFS
from devtools.tools import require_tool
from grok_pacs.config import load_settings
from grok_pacs.ingest.service import IngestService
from grok_pacs.jobs.publisher import JobPublisher
from grok_pacs.store.index import StudyState

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "bench" / "results" / "upload.json"
QUIET_S = 0.5  # short, so that the upload step shows; with the default 5 s it overlaps the quiet period
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # Debian's DCMTK: no 40 ms delayed-ACK stalls


def make_studies(directory: Path, count: int, with_opt: bool) -> list[tuple[str, list[Path]]]:
    """`count` studies of 2 OP (~300 KB, JPEG baseline), plus one 32 MB OPT each when `with_opt`."""
    photo = fundus_photograph(generate_uid(), "R", size=1024, quality=77)
    volume = oct_tomography(generate_uid(), "R", frames=128, rows=512, columns=512) if with_opt else None
    studies = []
    for number in range(count):
        study, files = generate_uid(), []
        for template, name in [(photo, "op_r"), (photo, "op_l"), *([(volume, "opt")] if volume else [])]:
            template.StudyInstanceUID, template.SeriesInstanceUID = study, generate_uid()
            template.SOPInstanceUID = generate_uid()
            files.append(write(template, directory / f"{number:03}" / f"{name}.dcm"))
        studies.append((study, files))
    return studies


def _send(port: int, files: list[Path]) -> None:
    command = [require_tool("storescu"), "-xy", "-aec", "GROK_PACS", "127.0.0.1", str(port), *map(str, files)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=DCMTK_ENV)
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed: {done.stderr}")


def _queued_after(service: IngestService, study: str, timeout: float = 120.0) -> float:
    """Seconds from now until the study is QUEUED (polled every 5 ms)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        record = service.index.study(study)
        if record is not None and record.state is StudyState.QUEUED:
            return time.perf_counter() - start
        time.sleep(0.005)
    raise TimeoutError(f"study not queued after {timeout} s")


def run_layout(work: Path, studies: list[tuple[str, list[Path]]], storage: dict, quiet: float) -> dict[str, float]:
    settings = load_settings(
        data_dir=work / "data", port=free_port(), bind_address="127.0.0.1", quiet_period=quiet,
        min_free_disk_mb=1, **storage,
    )  # fmt: skip
    service = IngestService(settings, JobPublisher(settings))
    service.start()
    try:
        seconds = []
        for study, files in studies:
            _send(service.port, files)
            seconds.append(_queued_after(service, study))
    finally:
        service.stop()
    ordered = sorted(seconds)
    return {
        "studies": len(seconds),
        "success_to_queued_p50_s": round(statistics.median(seconds), 3),
        "success_to_queued_p90_s": round(ordered[int(0.9 * (len(ordered) - 1))], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--quiet", type=float, default=QUIET_S, help="quiet period, seconds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="grok-uploadbench-") as tmp:
        work = Path(tmp)
        server = SeaweedFS(work / "seaweedfs", volumes=24)  # 10 x 32 MB OPT and more: 24 x 64 MB
        try:
            for workload, with_opt in (("2_op_300kb", False), ("2_op_300kb_1_opt_32mb", True)):
                for layout in ("one-box", "object-store"):
                    storage = {}
                    if layout == "object-store":
                        storage = {
                            "storage_url": f"s3://{BUCKET}/bench-{workload}",
                            "storage_endpoint": server.endpoint,
                            "storage_access_key": ACCESS_KEY,
                            "storage_secret_key": SECRET_KEY,
                        }
                    studies = make_studies(work / "files" / workload / layout, args.studies, with_opt)
                    results[f"{workload}/{layout}"] = run_layout(work / workload / layout, studies, storage, args.quiet)
                    print(workload, layout, results[f"{workload}/{layout}"], flush=True)
                base, store = results[f"{workload}/one-box"], results[f"{workload}/object-store"]
                overhead = store["success_to_queued_p50_s"] - base["success_to_queued_p50_s"]
                results[f"{workload}/upload_overhead_p50_s"] = round(overhead, 3)
        finally:
            server.stop()
    report = {
        "benchmark": "upload step: last C-STORE Success to study QUEUED (bench/upload.py)",
        "quiet_period_s": args.quiet,
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(),
        },
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
