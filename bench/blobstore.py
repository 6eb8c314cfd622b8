"""Blob store benchmark: put and verified get through grok_pacs.store, local files vs a real SeaweedFS (S3).

Workloads (the sizes of the ingest benchmark, docs/domain.md, Library facts): 200 objects of 300 KB (JPEG OP
photographs) and 5 objects of 32 MB (OPT volumes), random bytes, one thread, one fresh store each. `put` includes the
sha256 of the source (the key); `get` streams into a scratch directory and checks the sha256 before the
rename. Local = fsynced files under a data directory; S3 = `weed server` on loopback (no fsync: docs/domain.md, Library
facts). Writes bench/results/blobstore.json with the load average (2 cores shared with other work: noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from devtools.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedFS
from grok_pacs.config import load_settings
from grok_pacs.store.blobs import BlobKey, BlobStore
from grok_pacs.store.storage import open_blob_store

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "bench" / "results" / "blobstore.json"
STUDY = "1.2.826.0.1.3680043.8.498.7"
WORKLOADS = {"op_300kb": (200, 300 * 1024), "opt_32mb": (5, 32 * 1024 * 1024)}


def _sources(directory: Path, count: int, size: int) -> list[tuple[BlobKey, Path]]:
    directory.mkdir(parents=True, exist_ok=True)
    pairs = []
    for number in range(count):
        path = directory / f"{number}.dcm"
        path.write_bytes(os.urandom(size))
        pairs.append((BlobKey.for_file("instances", STUDY, f"1.2.3.{number}", path), path))
    return pairs


def _measure(store: BlobStore, pairs: list[tuple[BlobKey, Path]], scratch: Path, size: int) -> dict[str, float]:
    put_ms, get_ms = [], []
    for key, path in pairs:
        start = time.perf_counter()
        store.put(BlobKey.for_file(key.kind, key.study_uid, key.sop_uid, path), path)  # hash included
        put_ms.append((time.perf_counter() - start) * 1000)
    for key, _ in pairs:
        start = time.perf_counter()
        store.get(key, scratch)
        get_ms.append((time.perf_counter() - start) * 1000)
    megabytes = len(pairs) * size / 1e6
    return {
        "objects": len(pairs),
        "put_p50_ms": round(statistics.median(put_ms), 2),
        "get_p50_ms": round(statistics.median(get_ms), 2),
        "put_mb_s": round(megabytes / (sum(put_ms) / 1000), 1),
        "get_mb_s": round(megabytes / (sum(get_ms) / 1000), 1),
    }


def _stores(work: Path, server: SeaweedFS) -> dict[str, BlobStore]:
    s3 = load_settings(
        storage_url=f"s3://{BUCKET}/bench",
        storage_endpoint=server.endpoint,
        storage_access_key=ACCESS_KEY,
        storage_secret_key=SECRET_KEY,
    )
    return {"local": open_blob_store(load_settings(data_dir=work / "data")), "s3_seaweedfs": open_blob_store(s3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="grok-blobbench-") as tmp:
        work = Path(tmp)
        server = SeaweedFS(work / "seaweedfs", volumes=8)  # 220 MB of objects: room beyond 4 x 64 MB
        try:
            stores = _stores(work, server)
            for workload, (count, size) in WORKLOADS.items():
                pairs = _sources(work / "src" / workload, count, size)
                for name, store in stores.items():
                    results[f"{name}/{workload}"] = _measure(store, pairs, work / "scratch" / name, size)
                    print(name, workload, results[f"{name}/{workload}"], flush=True)
            for store in stores.values():
                store.close()
        finally:
            server.stop()
    report = {
        "benchmark": "blob store put / verified get (bench/blobstore.py)",
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()},
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
