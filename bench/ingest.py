"""Ingest benchmark: DCMTK storescu -> grok-pacs listener vs -> DCMTK storescp, same files, one run.

Workloads (SPEC §6, issue 3): 20 multi-frame OPT instances of ~32 MB (uncompressed, 128 x 512 x 512), and
200 OP JPEG-baseline instances of ~300 KB (20 studies x 2 eyes x 5 photographs). Each (target, workload) is sent
REPEATS times by one storescu
process (one association), each time into a fresh, empty receiver (grok-pacs would otherwise answer
duplicates without storing them), alternating targets; the median wall time counts.

grok-pacs runs as `grok-pacs listen` (its own process, defaults: max PDU unlimited, fsync + atomic rename
+ SQLite commit per instance), once with the pynetdicom fast path (grok_pacs.dicom.fastpath, the default)
and once without it (`grok-nofast`: GROK_PACS_PYNETDICOM_FAST_PATH=false, pynetdicom as released). DCMTK storescp
runs with its defaults plus +xa (accept JPEG), writing
each file to disk without fsync; both DCMTK tools run with TCP_NODELAY=1 (see DCMTK_ENV). Writes
bench/results/ingest.json.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devtools.ports import free_port, wait_for_port  # noqa: E402
from devtools.sample_dicom import fundus_photograph, oct_tomography, write  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "ingest.json"
OP_PER_SERIES = 5
AE = "GROK_PACS"
# Debian's DCMTK leaves Nagle's algorithm on unless TCP_NODELAY=1 is in the environment; with it on, every
# small-instance C-STORE waits ~40 ms for a delayed ACK and DCMTK looks 20x slower than it is. Both DCMTK
# processes get it (pynetdicom's sockets are unaffected), so the reference is DCMTK at its best.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


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
    if not (opt_dir.is_dir() and len(list(opt_dir.iterdir())) == opt_count):
        shutil.rmtree(opt_dir, ignore_errors=True)
        template = oct_tomography(generate_uid(), "R", frames=128, rows=512, columns=512)
        study = generate_uid()
        for number in tqdm(range(opt_count), desc="OPT files", leave=False):
            template.StudyInstanceUID, template.SeriesInstanceUID = study, generate_uid()
            template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            write(template, opt_dir / f"opt_{number:03}.dcm")
    if not (op_dir.is_dir() and len(list(op_dir.iterdir())) == op_count):
        shutil.rmtree(op_dir, ignore_errors=True)
        template = fundus_photograph(generate_uid(), "L", size=1024, quality=77)
        for number in tqdm(range(op_count), desc="OP files", leave=False):
            if number % OP_PER_SERIES == 0:  # a fundus camera: a few photographs per eye, two eyes per study
                study = study if number % (2 * OP_PER_SERIES) else generate_uid()
                template.StudyInstanceUID, template.SeriesInstanceUID = study, generate_uid()
            template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            write(template, op_dir / f"op_{number:03}.dcm")
    return {"opt": sorted(opt_dir.iterdir()), "op": sorted(op_dir.iterdir())}


TARGETS = ("dcmtk", "grok", "grok-nofast")


def start_grok(port: int, data_dir: Path, fast_path: bool = True) -> subprocess.Popen:
    env = {
        **os.environ,
        "GROK_PACS_PORT": str(port),
        "GROK_PACS_DATA_DIR": str(data_dir),
        "GROK_PACS_BIND_ADDRESS": "127.0.0.1",
        "GROK_PACS_QUIET_PERIOD": "2",
        "GROK_PACS_MIN_FREE_DISK_MB": "100",
        "GROK_PACS_PYNETDICOM_FAST_PATH": str(fast_path).lower(),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "grok_pacs.cli", "--log-level", "WARNING", "listen"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def start_dcmtk(port: int, data_dir: Path) -> subprocess.Popen:
    data_dir.mkdir(parents=True)
    return subprocess.Popen(
        ["storescp", "+xa", "-aet", AE, "-od", str(data_dir), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def send(port: int, files: list[Path], propose: list[str]) -> float:
    """Wall seconds for one storescu run of `files` (one association)."""
    command = ["storescu", *propose, "-aet", "BENCH", "-aec", AE, "127.0.0.1", str(port), *map(str, files)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=DCMTK_ENV)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed ({done.returncode}): {done.stderr[-1000:]}")
    return elapsed


def run_once(target: str, files: list[Path], propose: list[str], scratch: Path) -> float:
    port, data_dir = free_port(), Path(tempfile.mkdtemp(dir=scratch, prefix=f"{target}-"))
    if target == "dcmtk":
        process = start_dcmtk(port, data_dir / "data")
    else:
        process = start_grok(port, data_dir / "data", fast_path=target == "grok")
    try:
        wait_for_port(port)
        seconds = send(port, files, propose)
        where = data_dir / "data" / ("" if target == "dcmtk" else "incoming")
        stored = sum(1 for p in where.rglob("*") if p.is_file())
        if stored != len(files):
            raise RuntimeError(f"{target}: {stored} of {len(files)} files stored")
        return seconds
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(data_dir, ignore_errors=True)


def measure(name: str, files: list[Path], propose: list[str], repeats: int, scratch: Path) -> dict:
    total_mb = sum(p.stat().st_size for p in files) / 1e6
    times: dict[str, list[float]] = {target: [] for target in TARGETS}
    for _ in tqdm(range(repeats), desc=name, leave=False):
        for target in TARGETS:
            times[target].append(run_once(target, files, propose, scratch))
    row: dict = {
        "instances": len(files),
        "total_mb": round(total_mb, 1),
        "mean_instance_mb": round(total_mb / len(files), 3),
    }
    for target, samples in times.items():
        median = statistics.median(samples)
        row[target] = {
            "seconds_median": round(median, 3),
            "seconds_all": [round(s, 3) for s in samples],
            "mb_s": round(total_mb / median, 1),
            "inst_s": round(len(files) / median, 1),
        }
    row["ratio_mb_s"] = round(row["grok"]["mb_s"] / row["dcmtk"]["mb_s"], 3)
    row["ratio_inst_s"] = round(row["grok"]["inst_s"] / row["dcmtk"]["inst_s"], 3)
    row["nofast_ratio_mb_s"] = round(row["grok-nofast"]["mb_s"] / row["dcmtk"]["mb_s"], 3)
    row["fast_path_speedup"] = round(row["grok"]["inst_s"] / row["grok-nofast"]["inst_s"], 3)
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
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} (DCMTK) is not installed: run scripts/install-system-deps.sh")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    files = make_files(args.work_dir / "files", args.opt, args.op)
    scratch = args.work_dir / "runs"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    load_before = os.getloadavg()
    fsync_ms = fsync_latency_ms(scratch / "fsync-probe")
    results = {
        "opt_32mb": measure("OPT ~32 MB", files["opt"], [], args.repeats, scratch),
        "op_jpeg_300kb": measure("OP JPEG ~300 KB", files["op"], ["-xy"], args.repeats, scratch),
    }
    report = {
        "benchmark": "ingest: DCMTK storescu -> grok-pacs listen vs DCMTK storescp (+xa), loopback",
        "targets": {"opt_32mb": {"ratio_mb_s": 1.0}, "op_jpeg_300kb": {"ratio_inst_s": 0.5}},
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{'workload':16} {'grok MB/s':>10} {'no-fast MB/s':>13} {'DCMTK MB/s':>11} {'ratio':>6} "
        f"{'grok inst/s':>12} {'no-fast inst/s':>15} {'DCMTK inst/s':>13} {'ratio':>6} {'fast/no-fast':>13}"
    )
    for name, row in results.items():
        print(
            f"{name:16} {row['grok']['mb_s']:10.1f} {row['grok-nofast']['mb_s']:13.1f} {row['dcmtk']['mb_s']:11.1f} "
            f"{row['ratio_mb_s']:6.2f} {row['grok']['inst_s']:12.1f} {row['grok-nofast']['inst_s']:15.1f} "
            f"{row['dcmtk']['inst_s']:13.1f} {row['ratio_inst_s']:6.2f} {row['fast_path_speedup']:13.2f}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
