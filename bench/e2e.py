#!/usr/bin/env python
"""End-to-end benchmark: C-STORE of a study -> SR stored at the destination PACS, tiny bundle on CPU.

Real peers throughout: a Redis broker, the grok-pacs listener (in this process), `grok-pacs worker`
processes (one BLAS thread each), DCMTK storescp as the destination. A study is the demo study: both
eyes, each a JPEG CFP (256 px) and a 16-frame OCT, so two SRs per study.

Measured:
- latency: from the last instance's C-STORE response (the client has its answer) to the last SR of the
  study written by the destination, minus the quiet period (the wait that makes a study complete), one
  study at a time, one warm worker. Target <= 5 s.
- throughput: studies per minute for a burst of studies sent back to back, with 1 and with 2 warm
  workers; scale_2_over_1 is their ratio. Target >= 1.8 (needs at least two free cores). Worker CPU
  seconds per study and the workers' CPU utilisation (CPU time / wall time / workers) are recorded too:
  equal CPU per study with 1 and 2 workers means no contention inside grok-pacs; utilisation well below
  1 with 2 workers means the machine had no second free core.
Layouts (`--layout`): `one-box` (the listener and the workers share one data directory and its SQLite
index) and `many-hosts` (issue 17: a real PostgreSQL for index and outbox, SeaweedFS as the object store;
the listener uploads each instance, every worker has its own empty data directory and fetches the study
from the store). `both` runs the two and reports the many-hosts layout's latency overhead (p50 - p50).
Writes bench/results/e2e.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from devtools.bundle_cache import CACHE_ROOT, cached_tiny_bundle
from devtools.ports import free_port
from devtools.postgres import Postgres
from devtools.processes import GrokProcess, Redis, grok_env, wait_until
from devtools.sample_dicom import demo_study
from devtools.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedFS
from devtools.storescp import StoreSCP
from grok_pacs.config import Peer, load_settings
from grok_pacs.dicom.scu import store_files
from grok_pacs.ingest.service import IngestService
from grok_pacs.jobs.publisher import JobPublisher

ROOT = Path(__file__).resolve().parents[1]

LATENCY_TARGET_S = 5.0
SCALE_TARGET = 1.8
SRS_PER_STUDY = 2
LAYOUTS = ("one-box", "many-hosts")


def many_hosts_settings(work: Path, servers: list) -> dict:
    """A real PostgreSQL (index and outbox) and SeaweedFS (instances and results) shared by every host."""
    postgres = Postgres(work / "postgres")
    servers.append(postgres)
    store = SeaweedFS(work / "seaweedfs")
    servers.append(store)
    return dict(
        database_url=postgres.new_database(),
        storage_url=f"s3://{BUCKET}/e2e",
        storage_endpoint=store.endpoint,
        storage_access_key=ACCESS_KEY,
        storage_secret_key=SECRET_KEY,
    )


class Rig:
    """Redis + listener + destination + N worker processes; one-box: one data directory for all, many-hosts:
    PostgreSQL + SeaweedFS shared, a data directory each (workers never read the listener's disk)."""

    def __init__(self, work: Path, bundle: Path, quiet_period: float, layout: str = "one-box") -> None:
        self.work, self.layout, self.servers = work, layout, []
        self.redis = Redis(work)
        self.pacs = StoreSCP(free_port(), work / "pacs").start()
        shared = many_hosts_settings(work, self.servers) if layout == "many-hosts" else {}
        self.values = dict(
            data_dir=work / "data",
            broker_url=self.redis.url,
            bundle=bundle,
            quiet_period=quiet_period,
            destination=f"PACS@127.0.0.1:{self.pacs.port}",
            job_time_limit=300,
            **shared,
        )
        self.settings = load_settings(**self.values, port=free_port(), bind_address="127.0.0.1")
        self.ingest = IngestService(self.settings, JobPublisher(self.settings))
        self.ingest.start()
        self.workers: list[GrokProcess] = []
        self.sent = 0

    def add_worker(self) -> None:
        name = f"worker{len(self.workers)}"
        values = dict(self.values)
        if self.layout == "many-hosts":
            values["data_dir"] = self.work / name  # its own, empty: what it needs comes from the store
        proc = GrokProcess(["worker"], grok_env(**values), self.work / f"{name}.log")
        proc.wait_ready("worker ready", timeout=300)
        self.workers.append(proc)

    def send(self) -> float:
        """C-STORE one demo study; returns the time the last C-STORE response arrived."""
        files = demo_study(self.work / "studies" / f"{self.sent:04d}")
        self.sent += 1
        results = store_files(self.peer, files, calling_ae="BENCH")
        done = time.time()
        if not all(r.ok for r in results):
            raise RuntimeError(f"study not stored: {[r.status_name for r in results]}")
        return done

    @property
    def peer(self) -> Peer:
        return Peer(ae_title=self.settings.ae_title, host="127.0.0.1", port=self.ingest.port)

    def received(self) -> list[Path]:
        """The SRs received (storescp names files by modality; the PDF reports, "DOC...", are not timed)."""
        return sorted(p for p in self.pacs.out_dir.iterdir() if p.is_file() and p.name.startswith("SR"))

    def wait_for(self, count: int, timeout: float) -> float:
        """Wait until `count` SRs have arrived; returns the newest SR file's write time."""
        files = wait_until(
            lambda: f if len(f := self.received()) >= count else None,
            timeout,
            f"{count} SRs at the destination",
            interval=0.02,
        )
        return max(f.stat().st_mtime for f in files)

    def close(self) -> None:
        for proc in self.workers:
            proc.stop()
        self.ingest.stop()
        self.pacs.stop()
        self.redis.stop()
        for server in reversed(self.servers):
            server.stop()


def measure_latency(rig: Rig, studies: int) -> list[float]:
    latencies = []
    for _ in tqdm(range(studies), desc="latency (1 study at a time)"):
        expected = len(rig.received()) + SRS_PER_STUDY
        sent_at = rig.send()
        arrived = rig.wait_for(expected, timeout=300)
        latencies.append(arrived - sent_at - rig.settings.quiet_period)
    return latencies


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), to tell our cost from the machine's load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_throughput(rig: Rig, studies: int, label: str) -> dict:
    expected = len(rig.received()) + SRS_PER_STUDY * studies
    cpu_before = sum(cpu_seconds(w.pid) for w in rig.workers)
    start = time.time()
    for _ in tqdm(range(studies), desc=f"throughput burst, {label}"):
        rig.send()
    last = rig.wait_for(expected, timeout=1800)
    elapsed = last - start
    worker_cpu = sum(cpu_seconds(w.pid) for w in rig.workers) - cpu_before
    return {
        "studies": studies,
        "elapsed_s": round(elapsed, 3),
        "studies_per_min": round(studies * 60 / elapsed, 2),
        "worker_cpu_s_per_study": round(worker_cpu / studies, 3),
        "worker_cpu_utilisation": round(worker_cpu / elapsed / len(rig.workers), 3),
    }


def warm_up(rig: Rig) -> None:
    """One study per worker, so each worker has loaded the bundle before anything is timed."""
    expected = len(rig.received()) + SRS_PER_STUDY * len(rig.workers)
    for _ in rig.workers:
        rig.send()
    rig.wait_for(expected, timeout=600)


def run_layout(args: argparse.Namespace, bundle: Path, layout: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"grok-e2e-{layout}-") as tmp:
        rig = Rig(Path(tmp), bundle, args.quiet_period, layout)
        try:
            rig.add_worker()
            warm_up(rig)
            latencies = measure_latency(rig, args.latency_studies)
            one = measure_throughput(rig, args.burst_studies, "1 worker")
            rig.add_worker()
            warm_up(rig)
            two = measure_throughput(rig, args.burst_studies, "2 workers")
        finally:
            rig.close()
    p50 = statistics.median(latencies)
    scale = two["studies_per_min"] / one["studies_per_min"]
    return {
        "layout": layout,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "latency_s": [round(x, 3) for x in latencies],
        "latency_s_p50": round(p50, 3),
        "latency_s_max": round(max(latencies), 3),
        "latency_target_s": LATENCY_TARGET_S,
        "latency_ok": p50 <= LATENCY_TARGET_S,
        "throughput_1_worker": one,
        "throughput_2_workers": two,
        "scale_2_over_1": round(scale, 3),
        "scale_target": SCALE_TARGET,
        "scale_ok": scale >= SCALE_TARGET,
    }


def run(args: argparse.Namespace) -> dict:
    bundle = cached_tiny_bundle(CACHE_ROOT)
    layouts = LAYOUTS if args.layout == "both" else (args.layout,)
    results = {layout: run_layout(args, bundle, layout) for layout in layouts}
    first = results[layouts[0]]
    out = {
        "benchmark": "e2e",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "note": "shared machine: other processes compete for the same cores",
        },
        "setup": {
            "bundle": "tiny test bundle (devtools/tiny_bundle.py), CPU, 1 BLAS thread per worker",
            "broker": "redis",
            "destination": "DCMTK storescp",
            "quiet_period_s": args.quiet_period,
            "study": "demo study: 2 eyes x (JPEG CFP 256 px + OCT 16x128x128), 2 SRs per study",
            "many-hosts": "PostgreSQL 15 + SeaweedFS on loopback; each worker its own data directory",
        },
        **{k: v for k, v in first.items() if k != "layout"},  # the first layout's figures at the top level
        "layouts": results,
    }
    if len(results) == 2:
        out["many_hosts_latency_overhead_p50_s"] = round(
            results["many-hosts"]["latency_s_p50"] - results["one-box"]["latency_s_p50"], 3
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-studies", type=int, default=8, help="studies timed one at a time (default 8)")
    parser.add_argument("--burst-studies", type=int, default=12, help="studies per throughput burst (default 12)")
    parser.add_argument("--quiet-period", type=float, default=0.5, help="study quiet period in s (default 0.5)")
    parser.add_argument("--layout", choices=(*LAYOUTS, "both"), default="both", help="default both")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "e2e.json", help="result file")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for layout, figures in result["layouts"].items():
        print(
            layout, json.dumps({k: figures[k] for k in ("latency_s_p50", "scale_2_over_1", "latency_ok", "scale_ok")})
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
