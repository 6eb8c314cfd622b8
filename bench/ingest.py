"""Ingest benchmark: DCMTK storescu -> grok-pacs listen, DCMTK storescp, Orthanc, and the disk's floor, one run.

Workloads (docs/domain.md, Library facts; issue 3): 20 multi-frame OPT instances of ~32 MB (uncompressed, 128 x 512 x
512), and 200 OP JPEG-baseline instances of ~300 KB (20 studies x 2 eyes x 5 photographs). Each (workload, number of
associations: 1 and 8) is sent REPEATS times to every target (bench/ingest_targets.py: grok, grok-nofast,
dcmtk, orthanc; and `floor`, the same bytes written and fsynced with no DICOM), alternating targets, each
run into a fresh, empty receiver; with 8 associations, 8 storescu processes each send every 8th file at
once. The median wall time counts, `spread` is (max - min) / median. grok_over_X is X's median time over
grok's (above 1: grok-pacs faster). Writes bench/results/ingest.json with the load average of each round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom.uid import generate_uid
from tqdm import tqdm

from bench.ingest_targets import (
    AE,
    DCMTK_ENV,
    TARGETS,
    OrthancTarget,
    floor_seconds,
    start_dcmtk,
    start_grok,
    start_null,
)
from devtools.ports import free_port, wait_for_port
from devtools.sample_dicom import fundus_photograph, oct_tomography, write

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "bench" / "results" / "ingest.json"
OP_PER_SERIES = 5
CONCURRENCY = (1, 8)


def fsync_latency_ms(directory: Path, samples: int = 30) -> dict[str, float]:
    """Median fsync time of a new 300 KB file and of its directory after a rename, on the bench disk:
    the two ordered barriers every durably stored instance pays (DCMTK storescp pays none)."""
    directory.mkdir(parents=True, exist_ok=True)
    data, file_ms, dir_ms = os.urandom(300 * 1024), [], []
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        for number in range(samples):
            path = directory / f"probe{number}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.write(fd, data)
            start = time.perf_counter()
            os.fsync(fd)
            file_ms.append((time.perf_counter() - start) * 1000)
            os.close(fd)
            os.replace(path, directory / f"done{number}")
            start = time.perf_counter()
            os.fsync(dir_fd)
            dir_ms.append((time.perf_counter() - start) * 1000)
    finally:
        os.close(dir_fd)
        shutil.rmtree(directory, ignore_errors=True)
    return {"file_300kb": round(statistics.median(file_ms), 2), "directory": round(statistics.median(dir_ms), 2)}


def make_files(directory: Path, opt_count: int, op_count: int) -> dict[str, list[Path]]:
    """The two workloads, generated once (pixel content reused, UIDs unique per instance)."""
    opt_dir, op_dir = directory / "opt", directory / "op"
    if opt_count and not (opt_dir.is_dir() and len(list(opt_dir.iterdir())) == opt_count):
        shutil.rmtree(opt_dir, ignore_errors=True)
        template = oct_tomography(generate_uid(), "R", frames=128, rows=512, columns=512)
        study = generate_uid()
        for number in tqdm(range(opt_count), desc="OPT files", leave=False):
            template.StudyInstanceUID, template.SeriesInstanceUID = study, generate_uid()
            template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            write(template, opt_dir / f"opt_{number:03}.dcm")
    if op_count and not (op_dir.is_dir() and len(list(op_dir.iterdir())) == op_count):
        shutil.rmtree(op_dir, ignore_errors=True)
        template = fundus_photograph(generate_uid(), "L", size=1024, quality=77)
        for number in tqdm(range(op_count), desc="OP files", leave=False):
            if number % OP_PER_SERIES == 0:  # a fundus camera: a few photographs per eye, two eyes per study
                study = study if number % (2 * OP_PER_SERIES) else generate_uid()
                template.StudyInstanceUID, template.SeriesInstanceUID = study, generate_uid()
            template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            write(template, op_dir / f"op_{number:03}.dcm")
    # a count of 0 leaves that workload's files alone (another run may be using them) and skips it
    return {"opt": sorted(opt_dir.iterdir()) if opt_count else [], "op": sorted(op_dir.iterdir()) if op_count else []}


def send(port: int, files: list[Path], propose: list[str], associations: int) -> float:
    """Wall seconds until `associations` concurrent storescu processes (one association each, the files
    dealt out in turn) have all sent their share."""
    shares = [files[n::associations] for n in range(min(associations, len(files)))]
    start = time.perf_counter()
    senders = [
        subprocess.Popen(
            ["storescu", *propose, "-aet", f"BENCH{n}", "-aec", AE, "127.0.0.1", str(port), *map(str, share)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=DCMTK_ENV,
        )
        for n, share in enumerate(shares)
    ]
    errors = [sender.communicate(timeout=600)[1] for sender in senders]
    elapsed = time.perf_counter() - start
    for sender, error in zip(senders, errors):
        if sender.returncode != 0:
            raise RuntimeError(f"storescu failed ({sender.returncode}): {error[-1000:]}")
    return elapsed


def run_once(
    target: str, files: list[Path], propose: list[str], scratch: Path, associations: int, checkout: Path = ROOT
) -> float:
    """Seconds to send `files` to a fresh `target`; `checkout`: whose grok_pacs a grok target runs."""
    port, run_dir = free_port(), Path(tempfile.mkdtemp(dir=scratch, prefix=f"{target}-"))
    data_dir = run_dir / "data"
    if target == "floor":
        seconds = floor_seconds(files, data_dir, associations)
        shutil.rmtree(run_dir, ignore_errors=True)
        return seconds
    orthanc = OrthancTarget(port, data_dir) if target == "orthanc" else None
    if orthanc is not None:
        process = orthanc.proc
    elif target == "dcmtk":
        process = start_dcmtk(port, data_dir)
    elif target == "pynetdicom-null":
        process = start_null(port, data_dir)
    else:
        process = start_grok(port, data_dir, fast_path=target == "grok", checkout=checkout)
    try:
        wait_for_port(port, timeout=60, proc=process, what=target)
        seconds = send(port, files, propose, associations)
        if target == "pynetdicom-null":
            return seconds  # it keeps nothing by design
        if orthanc is not None:
            stored = orthanc.instances()
        else:
            where = data_dir / ("" if target == "dcmtk" else "incoming")
            stored = sum(1 for p in where.rglob("*") if p.is_file())
        if stored != len(files):
            raise RuntimeError(f"{target}: {stored} of {len(files)} files stored")
        return seconds
    finally:
        process.terminate()
        process.wait(timeout=60)
        shutil.rmtree(run_dir, ignore_errors=True)


def spread(samples: list[float]) -> float:
    """(max - min) / median: how far apart the runs of one target were."""
    return round((max(samples) - min(samples)) / statistics.median(samples), 3)


def measure(
    name: str,
    files: list[Path],
    propose: list[str],
    repeats: int,
    scratch: Path,
    associations: int,
    targets: tuple[str, ...] = TARGETS,
) -> dict:
    """Every target `repeats` times, alternating targets, each run into an empty receiver."""
    total_mb = sum(p.stat().st_size for p in files) / 1e6
    times: dict[str, list[float]] = {target: [] for target in targets}
    loads = [os.getloadavg()[0]]
    for _ in tqdm(range(repeats), desc=f"{name} x{associations}", leave=False):
        for target in targets:
            times[target].append(run_once(target, files, propose, scratch, associations))
        loads.append(os.getloadavg()[0])
    row: dict = {"associations": associations, "instances": len(files), "total_mb": round(total_mb, 1)}
    row["load_average_1m"] = [round(load, 2) for load in loads]
    for target, samples in times.items():
        median = statistics.median(samples)
        row[target] = {
            "seconds_median": round(median, 3),
            "seconds_all": [round(s, 3) for s in samples],
            "spread": spread(samples),
            "mb_s": round(total_mb / median, 1),
            "inst_s": round(len(files) / median, 1),
        }
    for reference in ("floor", "dcmtk", "orthanc", "pynetdicom-null"):
        if reference in row and "grok" in row:
            row[f"grok_over_{reference}"] = round(row[reference]["seconds_median"] / row["grok"]["seconds_median"], 3)
    if "pynetdicom-null" in row and "floor" in row:  # the bound of a pynetdicom receiver, against the floor
        row["null_over_floor"] = round(row["floor"]["seconds_median"] / row["pynetdicom-null"]["seconds_median"], 3)
    if "grok-nofast" in row and "grok" in row:
        row["fast_path_speedup"] = round(row["grok-nofast"]["seconds_median"] / row["grok"]["seconds_median"], 3)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs per target and workload (median counts)")
    parser.add_argument("--opt", type=int, default=20, help="number of ~32 MB OPT instances (20)")
    parser.add_argument("--op", type=int, default=200, help="number of ~300 KB JPEG OP instances (200)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=ROOT / ".cache" / "bench-ingest",
        help="where test files and receivers' data go (same disk as a real data dir)",
    )
    parser.add_argument("--associations", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS), help="receivers to run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    for tool in ("storescu", "storescp", "Orthanc"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed: run scripts/install-system-deps.sh")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    files = make_files(args.work_dir / "files", args.opt, args.op)
    scratch = args.work_dir / "runs"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    load_before = os.getloadavg()
    fsync_ms = fsync_latency_ms(scratch / "fsync-probe")
    workloads = {"opt_32mb": (files["opt"], []), "op_jpeg_300kb": (files["op"], ["-xy"])}
    workloads = {name: work for name, work in workloads.items() if work[0]}
    results = {
        f"{name}_x{n}": measure(name, work, propose, args.repeats, scratch, n, tuple(args.targets))
        for n in args.associations
        for name, (work, propose) in workloads.items()
    }
    report = {
        "benchmark": "ingest: DCMTK storescu -> grok-pacs listen, DCMTK storescp (+xa), Orthanc, fsync floor; loopback",
        "targets": {
            "op_jpeg_300kb_x1": {"grok_over_floor": 0.75},
            "op_jpeg_300kb_x8": {"inst_s_over_x1": 2.0},
            "opt_32mb_x1": {"grok_over_floor": 0.9},
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            # other work on the machine slows Python (two threads per association) more than DCMTK
            "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "fsync_median_ms": fsync_ms,
        },
        "repeats": args.repeats,
        "results": results,
    }
    if "op_jpeg_300kb_x1" in results and "op_jpeg_300kb_x8" in results and "grok" in args.targets:
        report["op_x8_over_x1"] = round(
            results["op_jpeg_300kb_x1"]["grok"]["seconds_median"]
            / results["op_jpeg_300kb_x8"]["grok"]["seconds_median"],
            3,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    targets = list(args.targets)
    print(f"{'workload':20} " + " ".join(f"{t + ' inst/s':>18}" for t in targets) + "  ratios")
    for name, row in results.items():
        cells = " ".join(f"{row[t]['inst_s']:9.1f} ±{100 * row[t]['spread']:4.0f}%  " for t in targets)
        ratios = " ".join(f"{k}={v:.2f}" for k, v in row.items() if k.endswith(("_over_floor", "_over_dcmtk")))
        print(f"{name:20} {cells} {ratios}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
