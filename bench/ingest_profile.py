"""Where one small instance's time goes in `grok-pacs listen`: an in-process listener whose steps are timed.

DCMTK storescu sends N JPEG OP instances (~280 KB, bench/ingest.py's OP workload) over one association to
a Listener in this process. The timers wrap the real functions (nothing is replaced): the DIMSE message
being complete in the DUL thread, the handler call, and inside it the header check, each fsync (the file's
in the fsync pool, each directory's), the rename and the index commit; the wait for the file's fsync is
the part of it the handler could not hide. Per-instance medians (ms) go to bench/results/ingest_profile.json.
The timers cost a few microseconds each; `--repeats` runs the whole send again (fresh data directory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from bench.ingest import make_files, send
from bench.ingest_targets import start_dcmtk
from devtools.ports import free_port, wait_for_port
from grok_pacs.config import load_settings
from grok_pacs.ingest import listener as listener_module
from grok_pacs.ingest.listener import Listener
from grok_pacs.store import files as files_module
from grok_pacs.store.index import StudyIndex

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "bench" / "results" / "ingest_profile.json"
SAMPLES: dict[str, list[float]] = defaultdict(list)
MARKS: dict[str, float] = {}
_lock = threading.Lock()


def record(name: str, seconds: float) -> None:
    with _lock:
        SAMPLES[name].append(seconds * 1000)


def timed(name: str, function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            record(name, time.perf_counter() - start)

    return wrapper


def instrument() -> None:
    """Wrap the write path's steps with timers (the functions themselves run unchanged)."""
    from pynetdicom.dimse import DIMSEServiceProvider

    files_module._fsync_and_close = timed(
        "file fsync (fsync pool, overlaps the header check)", files_module._fsync_and_close
    )
    files_module.fsync_dir = timed("directory fsync (fsync pool, overlaps the index commit)", files_module.fsync_dir)
    files_module.make_dirs = timed("make_dirs (mkdir when a series is new)", files_module.make_dirs)
    listener_module.read_header = timed("header check (tag walk, no pixels)", listener_module.read_header)
    StudyIndex.add_instances = timed(
        "index commit (the listener's rows: SQLite WAL, synchronous=NORMAL)", StudyIndex.add_instances
    )
    real_replace = os.replace

    class _Os:
        def __getattr__(self, name):
            return getattr(os, name)

        replace = staticmethod(timed("rename into incoming/", real_replace))

    files_module.os = _Os()

    real_start = listener_module.start_fsync

    class _TimedFuture:
        def __init__(self, future) -> None:
            self.future = future

        def result(self):
            start = time.perf_counter()
            try:
                return self.future.result()
            finally:
                record("wait for the file fsync (not hidden by the header check)", time.perf_counter() - start)

    listener_module.start_fsync = lambda path: _TimedFuture(real_start(path))
    real_receive = DIMSEServiceProvider.receive_primitive

    def receive_primitive(self, primitive) -> None:
        before = self.msg_queue.qsize()
        MARKS["pdata"] = MARKS.get("pdata", 0) + 1
        real_receive(self, primitive)
        if self.msg_queue.qsize() > before:
            now = time.perf_counter()
            MARKS["complete"] = now
            if "handler_end" in MARKS:
                record("previous response sent -> next dataset complete (DUL)", now - MARKS["handler_end"])

    DIMSEServiceProvider.receive_primitive = receive_primitive
    real_store = Listener._on_store

    def on_store(self, event):
        start = time.perf_counter()
        if "complete" in MARKS:
            record("dataset complete -> handler called (wake-up, dispatch)", start - MARKS["complete"])
        try:
            return real_store(self, event)
        finally:
            MARKS["handler_end"] = time.perf_counter()
            record("handler total", MARKS["handler_end"] - start)

    Listener._on_store = on_store


def run(files: list[Path], scratch: Path, fast_path: bool, associations: int) -> float:
    data_dir = Path(tempfile.mkdtemp(dir=scratch))
    settings = load_settings(
        data_dir=data_dir,
        port=free_port(),
        bind_address="127.0.0.1",
        min_free_disk_mb=100,
        pynetdicom_fast_path=fast_path,
    )
    index = StudyIndex(settings.index_path)
    listener = Listener(settings, index)
    listener.start()
    MARKS.clear()
    try:
        before = os.times()
        elapsed = send(listener.port, files, ["-xy"], associations)
        after = os.times()
        MARKS["user_ms_per_instance"] = 1000 * (after.user - before.user) / len(files)
        MARKS["system_ms_per_instance"] = 1000 * (after.system - before.system) / len(files)
        MARKS["rows_per_commit"] = listener.commits.rows / max(1, listener.commits.batches)
        return elapsed
    finally:
        listener.stop()
        index.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def dcmtk_seconds(files: list[Path], scratch: Path) -> float:
    """The same send into DCMTK storescp (no fsync): what storescu and a C++ receiver take together."""
    port, data_dir = free_port(), Path(tempfile.mkdtemp(dir=scratch)) / "data"
    process = start_dcmtk(port, data_dir)
    try:
        wait_for_port(port, timeout=30, proc=process, what="storescp")
        return send(port, files, ["-xy"], 1)
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(data_dir.parent, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--associations", type=int, default=1, help="concurrent storescu processes")
    parser.add_argument("--no-fast-path", action="store_true", help="pynetdicom as released")
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".cache" / "bench-ingest")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    files = make_files(args.work_dir / "files", 0, args.op)["op"]
    scratch = args.work_dir / "profile"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    instrument()
    load = [os.getloadavg()[0]]
    walls, dcmtk = [], []
    for _ in range(args.repeats):
        walls.append(run(files, scratch, not args.no_fast_path, args.associations))
        dcmtk.append(dcmtk_seconds(files, scratch))
    load.append(os.getloadavg()[0])
    per_instance = 1000 * statistics.median(walls) / len(files)
    steps = {
        name: {
            "median_ms": round(statistics.median(v), 3),
            "p90_ms": round(sorted(v)[int(0.9 * len(v))], 3),
            "n": len(v),
        }
        for name, v in SAMPLES.items()
    }
    report = {
        "benchmark": "one small instance's time in the listener (in-process, timers around the real steps)",
        "instances": len(files),
        "mean_instance_kb": round(sum(p.stat().st_size for p in files) / len(files) / 1024, 1),
        "fast_path": not args.no_fast_path,
        "load_average_1m_before_after": [round(x, 2) for x in load],
        "wall_s_all": [round(w, 3) for w in walls],
        "per_instance_ms_median_run": round(per_instance, 3),
        # storescu + storescp (C++, no fsync) per instance: a bound on the sender's share of the DUL step
        "dcmtk_storescp_per_instance_ms": round(1000 * statistics.median(dcmtk) / len(files), 3),
        "inst_s_median_run": round(1000 / per_instance, 1),
        "p_data_pdus_per_instance": round(MARKS.get("pdata", 0) / len(files), 1),
        "index_rows_per_commit": round(MARKS.get("rows_per_commit", 0), 2),
        "associations": args.associations,
        # CPU seconds of this whole process (DUL + association threads, fsync pool) per instance
        "listener_cpu_ms_per_instance": {
            "user": round(MARKS.get("user_ms_per_instance", 0), 3),
            "system": round(MARKS.get("system_ms_per_instance", 0), 3),
        },
        "steps": steps,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['inst_s_median_run']} inst/s, {per_instance:.2f} ms per instance, load {load}")
    print(f"  DCMTK storescu -> storescp: {report['dcmtk_storescp_per_instance_ms']:.2f} ms per instance")
    for name, step in steps.items():
        print(f"  {step['median_ms']:8.3f} ms (p90 {step['p90_ms']:7.3f})  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
