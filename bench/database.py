"""Database benchmark: the index writes the listener makes and the claims workers make, on the embedded
SQLite file and on a real PostgreSQL 15 (devtools/postgres.py, loopback, default fsync settings).

Workloads: `add_instance` (one instance per transaction: what one association's C-STORE commits),
`add_instances` in batches of 8 (the group commit of 8 concurrent associations), and `Outbox.claim` +
`mark_delivered` per row (a worker's two writes per SR). Each runs REPEATS times into a fresh database;
the median counts. Writes bench/results/database.json with the load average (2 cores shared with other
work: noisy; compare the two dialects within one run, not across runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from devtools.postgres import Postgres
from grok_pacs.store.index import InstanceRecord, StudyIndex
from grok_pacs.store.outbox import Outbox, OutboxRow

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "bench" / "results" / "database.json"
OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"


def _record(n: int) -> InstanceRecord:
    study = f"1.2.826.0.1.3680043.8.498.{n // 10}"
    return InstanceRecord(
        study,
        f"{study}.1",
        f"{study}.1.{n}",
        OP_8BIT,
        "OP",
        "R",
        1,
        300_000,
        f"incoming/{n}.dcm",
        1e9 + n,
        "AE",
        "",
        "",
    )


def _per_second(count: int, run: Callable[[], None]) -> float:
    started = time.perf_counter()
    run()
    return count / (time.perf_counter() - started)


def _workloads(target: str | Path, rows: int) -> dict[str, float]:
    index, outbox = StudyIndex(target), Outbox(target)
    records = [_record(n) for n in range(2 * rows)]
    single = _per_second(rows, lambda: [index.add_instance(r) for r in records[:rows]])
    batches = [records[rows + i : rows + i + 8] for i in range(0, rows, 8)]
    batched = _per_second(rows, lambda: [index.add_instances(batch) for batch in batches])
    outbox.put_many([OutboxRow(f"2.25.{n}", "1.2", 1, "b", "R", f"sr/{n}.dcm") for n in range(rows)])

    def claim_and_deliver() -> None:
        for n in range(rows):
            outbox.claim(f"2.25.{n}", "bench", lease_s=600)
            outbox.mark_delivered(f"2.25.{n}", "bench", "PACS@h:104")

    claimed = _per_second(rows, claim_and_deliver)
    index.close()
    outbox.close()
    return {"add_instance_per_s": single, "add_instances_x8_rows_per_s": batched, "claim_deliver_per_s": claimed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400, help="instances (and outbox rows) per workload (400)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per dialect (median counts)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the SQLite files and PostgreSQL live")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="grok-db-bench-"))
    load_before = os.getloadavg()[0]
    server = Postgres(work / "postgres")
    runs: dict[str, list[dict[str, float]]] = {"sqlite": [], "postgresql": []}
    try:
        for repeat in range(args.repeats):  # alternate the dialects: load changes hit both alike
            runs["sqlite"].append(_workloads(work / f"sqlite-{repeat}" / "index.sqlite", args.rows))
            runs["postgresql"].append(_workloads(server.new_database(), args.rows))
    finally:
        server.stop()
    results = {
        dialect: {key: round(statistics.median(run[key] for run in found), 1) for key in found[0]}
        for dialect, found in runs.items()
    }
    report = {
        "benchmark": "database: index writes and outbox claims, embedded SQLite vs PostgreSQL 15 on loopback",
        "rows": args.rows,
        "repeats": args.repeats,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_1m_before_after": [load_before, os.getloadavg()[0]],
        },
        "results": results,
        "all_runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for dialect, values in results.items():
        print(f"{dialect:11} " + "  ".join(f"{key} {value:8.1f}" for key, value in values.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
