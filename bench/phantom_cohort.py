"""Benchmark: time a phantom cohort generation (issue 6: 500 subjects in a few minutes on 2 cores).

Writes bench/results/phantom_cohort.json: wall time, subjects per second, bytes written, CPU seconds (this
process and its workers; on a shared machine wall time depends on the load, CPU time much less), cores.
Usage: python -m bench.phantom_cohort [--subjects 500] [--workers 2] [--out DIR] [--no-dicom]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

from training.phantom import generate_cohort

RESULTS = Path(__file__).resolve().parent / "results" / "phantom_cohort.json"


def main() -> None:
    parser = argparse.ArgumentParser(description="Time the synthetic phantom cohort generator.")
    parser.add_argument("--subjects", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help="keep the cohort here (default: a temporary folder, removed)"
    )
    parser.add_argument("--no-dicom", action="store_true")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="phantom-bench-"))
    start = time.monotonic()
    manifest = generate_cohort(out, args.subjects, args.seed, dicom=not args.no_dicom, workers=args.workers)
    wall = time.monotonic() - start
    cpu = sum(
        getattr(resource.getrusage(who), field)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for field in ("ru_utime", "ru_stime")
    )
    size = sum(p.stat().st_size for p in manifest.parent.rglob("*") if p.is_file())
    result = {
        "benchmark": "phantom_cohort",
        "subjects": args.subjects,
        "workers": args.workers,
        "dicom": not args.no_dicom,
        "wall_s": round(wall, 1),
        "subjects_per_s": round(args.subjects / wall, 2),
        "bytes": size,
        "cpu_s": round(cpu, 1),
        "cpu_s_per_subject": round(cpu / args.subjects, 3),
        "wall_s_on_free_cores_estimate": round(cpu / min(args.workers, os.cpu_count() or 1), 1),
        "cpu_count": os.cpu_count(),
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        "machine": platform.platform(),
        "python": platform.python_version(),
    }
    if args.out is None:
        shutil.rmtree(out)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
