"""Hostile-network benchmark: `grok-pacs listen` (a subprocess, fast path on and off) against raw-socket attackers.

- flood: 16 connections declaring a 1 GiB A-ASSOCIATE-RQ and 16 associations declaring a 1 GiB P-DATA-TF;
  the listener's resident memory (VmRSS and its peak VmHWM, from /proc) before and after.
- half_open: HELD connections that never send a byte, re-opened as soon as the listener closes one (so the
  attacker always holds HELD), plus 16 that drip an association request; meanwhile a PACS opens TRIALS
  associations one after another (C-ECHO): the share that succeeds.
- pdu: ingest time of the benchmark's OPT (large) and OP (small) workloads (bench/ingest.py, one association)
  for several `max_pdu` values, alternating, medians: the default is chosen from this.

Writes bench/results/hostile.json. Run: `.venv/bin/python -m bench.hostile`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import socket
import statistics
import struct
import tempfile
import threading
import time
from pathlib import Path

from pynetdicom import AE

from bench.ingest import make_files, run_once
from bench.ingest_targets import AE as OUR_AE
from bench.ingest_targets import start_grok
from devtools.ports import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "hostile.json"
GIB = 1 << 30
MIB = 1 << 20


def _memory(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def _echo(port: int) -> bool:
    scu = AE(ae_title="BENCHPACS")
    scu.add_requested_context("1.2.840.10008.1.1")
    scu.acse_timeout = scu.network_timeout = 10
    assoc = scu.associate("127.0.0.1", port, ae_title=OUR_AE)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def _listener(fast_path: bool, scratch: Path):
    port, name = free_port(), f"{fast_path}-{time.monotonic_ns()}"
    log = open(scratch / f"listen-{name}.log", "wb")  # noqa: SIM115 - the listener's, closed with the scratch dir
    process = start_grok(port, scratch / f"data-{name}", fast_path=fast_path, log=log)
    wait_for_port(port, timeout=60, proc=process, what="grok-pacs listen")
    return port, process


def flood(fast_path: bool, scratch: Path) -> dict:
    port, process = _listener(fast_path, scratch)
    try:
        _echo(port)  # warm
        before = _memory(process.pid)
        hostile = []
        for _ in range(16):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(struct.pack(">BBL", 0x01, 0, GIB) + b"\0" * 65536)
            hostile.append(sock)
        associations = []
        for _ in range(16):
            scu = AE(ae_title="FLOOD")
            scu.add_requested_context("1.2.840.10008.1.1")
            assoc = scu.associate("127.0.0.1", port, ae_title=OUR_AE)
            assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, GIB) + b"\0" * 65536)
            associations.append(assoc)
        time.sleep(3)
        after = _memory(process.pid)
        alive = _echo(port)
        for sock in hostile:
            sock.close()
        return {
            "fast_path": fast_path,
            "rss_before_mib": round(before["VmRSS"] / MIB, 1),
            "rss_after_mib": round(after["VmRSS"] / MIB, 1),
            "rss_growth_mib": round((after["VmRSS"] - before["VmRSS"]) / MIB, 1),
            "peak_growth_mib": round((after["VmHWM"] - before["VmRSS"]) / MIB, 1),
            "pacs_echo_after": alive,
        }
    finally:
        process.terminate()
        process.wait(timeout=30)


class _Attacker:
    """Holds `held` silent connections, re-opening each one the listener closes, plus drippers."""

    def __init__(self, port: int, held: int) -> None:
        self.port, self.held, self.reopened = port, held, 0
        self.sockets = [self._open() for _ in range(held)]
        self.drippers = [self._open() for _ in range(16)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _open(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.setblocking(False)
        return sock

    def _run(self) -> None:
        while not self._stop.is_set():
            for sock in self.drippers:
                try:
                    sock.send(b"\x01")
                except OSError:
                    pass
            readable, _, _ = select.select(self.sockets, [], [], 0.2)
            for sock in readable:
                try:
                    gone = sock.recv(1) == b""
                except OSError:
                    gone = True
                if gone:
                    sock.close()
                    self.sockets[self.sockets.index(sock)] = self._open()
                    self.reopened += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for sock in self.sockets + self.drippers:
            sock.close()


def half_open(fast_path: bool, scratch: Path, held: int, trials: int) -> dict:
    port, process = _listener(fast_path, scratch)
    try:
        attacker = _Attacker(port, held)
        started = time.monotonic()
        succeeded = sum(_echo(port) for _ in range(trials))
        seconds = time.monotonic() - started
        attacker.stop()
        return {
            "fast_path": fast_path,
            "held": held,
            "trials": trials,
            "succeeded": succeeded,
            "success_rate": round(succeeded / trials, 4),
            "seconds_per_association": round(seconds / trials, 3),
            "attacker_reopened": attacker.reopened,
        }
    finally:
        process.terminate()
        process.wait(timeout=30)


def pdu_sizes(scratch: Path, sizes: list[int], repeats: int, opt: int, op: int) -> list[dict]:
    workloads = make_files(scratch / "workloads", opt, op)
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(repeats):
        for size in sizes:
            os.environ["GROK_PACS_MAX_PDU"] = str(size)
            for name, files in workloads.items():
                propose = [] if name == "opt" else ["-xy"]  # as bench/ingest.py proposes them
                times.setdefault((name, size), []).append(run_once("grok", files, propose, scratch, 1))
    os.environ.pop("GROK_PACS_MAX_PDU", None)
    return [
        {"workload": name, "max_pdu": size, "seconds_median": round(statistics.median(s), 3), "seconds_all": s}
        for (name, size), s in sorted(times.items())
    ]


def versus(scratch: Path, baseline: Path, repeats: int, opt: int, op: int) -> list[dict]:
    """Ingest time of this checkout against `baseline` (the release before the limits), each at its own
    defaults (fast path on), 1 and 8 associations, alternating, medians."""
    workloads = make_files(scratch / "workloads", opt, op)
    times: dict[tuple[str, int, str], list[float]] = {}
    for _ in range(repeats):
        for name, files in workloads.items():
            propose = [] if name == "opt" else ["-xy"]
            for associations in (1, 8):
                for label, checkout in (("now", ROOT), ("baseline", baseline)):
                    seconds = run_once("grok", files, propose, scratch, associations, checkout)
                    times.setdefault((name, associations, label), []).append(round(seconds, 3))
    rows = []
    for (name, associations, label), samples in sorted(times.items()):
        rows.append({"workload": name, "associations": associations, "code": label, "seconds_all": samples,
                     "seconds_median": round(statistics.median(samples), 3)})  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--held", type=int, default=1000, help="silent connections the attacker holds (1000)")
    parser.add_argument("--trials", type=int, default=100, help="PACS associations during the attack (100)")
    parser.add_argument("--pdu", type=int, nargs="*", default=[16384, 131072, 1 << 20, 4 << 20, 64 << 20])
    parser.add_argument("--repeats", type=int, default=3, help="runs per max_pdu value (median counts)")
    parser.add_argument("--opt", type=int, default=6, help="~32 MB OPT instances per run")
    parser.add_argument("--op", type=int, default=60, help="~300 KB OP instances per run")
    parser.add_argument(
        "--baseline", type=Path, help="a checkout of the release before (git worktree add DIR d548b46): compare ingest"
    )
    parser.add_argument("--only-baseline", action="store_true", help="run only the --baseline comparison")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result: dict = {"machine": f"{platform.node()} {os.cpu_count()} cores", "load_average_1m": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="grok-hostile-") as tmp:
        scratch = Path(tmp)
        if args.only_baseline:
            result = json.loads(args.out.read_text()) if args.out.is_file() else result
            result["versus_baseline"] = versus(scratch, args.baseline, args.repeats, args.opt, args.op)
            result["versus_baseline_load_average_1m"] = os.getloadavg()[0]
            args.out.write_text(json.dumps(result, indent=1) + "\n")
            print(json.dumps(result["versus_baseline"], indent=1))
            return 0
        result["flood"] = [flood(fast, scratch) for fast in (True, False)]
        print(json.dumps(result["flood"], indent=1), flush=True)
        result["half_open"] = [half_open(fast, scratch, args.held, args.trials) for fast in (True, False)]
        print(json.dumps(result["half_open"], indent=1), flush=True)
        if args.pdu:
            result["pdu"] = pdu_sizes(scratch, args.pdu, args.repeats, args.opt, args.op)
        if args.baseline:
            result["versus_baseline"] = versus(scratch, args.baseline, args.repeats, args.opt, args.op)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
