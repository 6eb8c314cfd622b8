"""The receivers bench/ingest.py compares, each started fresh into an empty directory, and the disk's floor.

- `grok`: `grok-pacs listen` (its own process, defaults: fast path on, durable before Success);
  `grok-nofast`: the same with GROK_PACS_PYNETDICOM_FAST_PATH=false (pynetdicom as released).
- `dcmtk`: DCMTK storescp +xa (accepts JPEG), writes each file without fsync.
- `orthanc`: Debian's Orthanc with its defaults for storage (SyncStorageArea: fsync of every file, SQLite index).
- `pynetdicom-null`: bench/null_scp.py, grok-pacs' listener with a handler that deletes each file and answers
  Success (no fsync, no index): the bound of any receiver built on pynetdicom in Python on this machine.
- `floor`: no DICOM at all: each file's bytes written to a new file and fsynced once, by as many writer
  threads as there are associations (what any durable receiver must at least pay).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AE = "GROK_PACS"
# Debian's DCMTK leaves Nagle's algorithm on unless TCP_NODELAY=1 is in the environment; with it on, every
# small-instance C-STORE waits ~40 ms for a delayed ACK and DCMTK looks 20x slower than it is. Both DCMTK
# processes get it (pynetdicom's sockets are unaffected), so the reference is DCMTK at its best.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
TARGETS = ("floor", "grok", "grok-nofast", "pynetdicom-null", "dcmtk", "orthanc")


def start_grok(port: int, data_dir: Path, fast_path: bool = True, log=None, checkout: Path = ROOT) -> subprocess.Popen:
    """`grok-pacs listen`; its log to `log` (an open file) when given: a pipe nobody reads would block it.
    `checkout`: whose grok_pacs runs (`python -m` imports it from the working directory first), e.g. a git
    worktree of an earlier release for a before/after comparison."""
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
        cwd=checkout,
        stdout=subprocess.DEVNULL,
        stderr=log if log is not None else subprocess.PIPE,
    )


def start_null(port: int, data_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.null_scp", str(port), str(data_dir)],
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


class OrthancTarget:
    """Orthanc with a config of only what the benchmark needs; storage options left at their defaults."""

    def __init__(self, port: int, data_dir: Path) -> None:
        data_dir.mkdir(parents=True)
        self.http_port = _free_port()
        config = {
            "Name": "bench",
            "StorageDirectory": str(data_dir / "storage"),
            "IndexDirectory": str(data_dir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": port,
            "DicomAet": AE,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "Plugins": [],
        }
        (data_dir / "orthanc.json").write_text(json.dumps(config))
        self.proc = subprocess.Popen(
            ["Orthanc", str(data_dir / "orthanc.json")],
            cwd=data_dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def instances(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/statistics", timeout=30) as response:
            return int(json.load(response)["CountInstances"])


def _free_port() -> int:
    from devtools.ports import free_port

    return free_port()


def floor_seconds(files: list[Path], out_dir: Path, writers: int) -> float:
    """Wall seconds to write each file's bytes (read beforehand) to a new file and fsync it once, the
    files split over `writers` threads (one per association)."""
    payloads = [path.read_bytes() for path in files]
    out_dir.mkdir(parents=True)
    shares = [list(range(n, len(files), writers)) for n in range(writers)]

    def write(numbers: list[int]) -> None:
        for number in numbers:
            fd = os.open(out_dir / f"{number}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, payloads[number])
                os.fsync(fd)
            finally:
                os.close(fd)

    threads = [threading.Thread(target=write, args=(share,)) for share in shares]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start
