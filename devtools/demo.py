"""`make demo`: the whole journey on one box, on embedded defaults.

1. Trains (once, cached under `.cache/pipeline/`) a small GROK on a synthetic phantom cohort:
   stage 1 instructions, stage 2 alignment + biomarker heads, stage 3 LoRA SFT, and exports a verified
   bundle (`python -m training.pipeline`, run as a subprocess: the runtime never imports `training`).
2. Starts a destination PACS (DCMTK `storescp`) and `grok-pacs serve` (listener + embedded worker on
   the embedded SQLite broker) on free loopback ports, with the data directory under `--demo-dir`.
3. Sends the DICOM study (CFP + OCT per eye) of a held-out phantom subject by C-STORE.
4. Waits for the SRs at the PACS and prints them readably; the last line is `SR: <path>`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from devtools.ports import free_port, wait_for_port
from grok_pacs.config import Peer
from grok_pacs.dicom.scu import store_files
from grok_pacs.report.render import render

PACS_AE = "DEMO_PACS"
SR_TIMEOUT_S = 900.0  # two eyes of SmolLM2 decoding on a loaded 2-core machine


def build_model(cache: Path, work: Path) -> dict:
    """Run (or reuse) the phantom training pipeline; returns its result paths."""
    print("[1/5] training pipeline (phantom cohort -> stages 1-3 -> bundle; cached after the first run)", flush=True)
    out = work / "pipeline.json"
    cmd = [sys.executable, "-m", "training.pipeline", "--cache", str(cache), "--json-out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def held_out_study(manifest: Path) -> tuple[Path, str, str]:
    """(DICOM study folder, subject id, true label) of the first test-split subject of the cohort."""
    with manifest.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["split"] == "test" and row.get("study_dir"):
                return manifest.parent / row["study_dir"], row["subject_id"], row["label"]
    raise RuntimeError(f"{manifest} has no test-split subject with a DICOM study")


def start_pacs(stack: ExitStack, pacs_dir: Path) -> Peer:
    """DCMTK storescp as the hospital PACS: every SR it receives becomes a file in `pacs_dir`."""
    tool = shutil.which("storescp")
    if tool is None:
        raise RuntimeError("DCMTK storescp is not installed (run scripts/install-system-deps.sh)")
    port = free_port()
    pacs_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [tool, "-aet", PACS_AE, "+uf", "-od", str(pacs_dir), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stack.callback(_stop, proc)
    wait_for_port(port, 120.0, proc=proc, what="storescp")
    return Peer(ae_title=PACS_AE, host="127.0.0.1", port=port)


def start_serve(stack: ExitStack, bundle: Path, data_dir: Path, pacs: Peer, log_path: Path) -> Peer:
    """`grok-pacs serve` on a free port, logging to `log_path`."""
    port = free_port()
    env = dict(
        os.environ,
        GROK_PACS_DATA_DIR=str(data_dir),
        GROK_PACS_PORT=str(port),
        GROK_PACS_BIND_ADDRESS="127.0.0.1",
        GROK_PACS_BUNDLE=str(bundle),
        GROK_PACS_DESTINATION=str(pacs),
        GROK_PACS_QUIET_PERIOD="1",
        GROK_PACS_BROKER_URL="",
    )
    log = stack.enter_context(log_path.open("w"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "grok_pacs.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    stack.callback(_stop, proc)
    wait_for_port(port, 120.0, proc=proc, what="grok-pacs serve")
    return Peer(ae_title="GROK_PACS", host="127.0.0.1", port=port)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for_srs(pacs_dir: Path, count: int, timeout: float = SR_TIMEOUT_S) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(p for p in pacs_dir.iterdir() if p.is_file() and p.name.startswith("SR"))
        if len(found) >= count:
            time.sleep(0.5)  # let storescp finish writing
            return found
        time.sleep(0.25)
    raise TimeoutError(f"no {count} SRs arrived at the PACS within {timeout:.0f} s (see the serve log)")


def run(demo_dir: Path, cache: Path) -> int:
    demo_dir = demo_dir.resolve()
    shutil.rmtree(demo_dir / "data", ignore_errors=True)
    shutil.rmtree(demo_dir / "pacs", ignore_errors=True)
    demo_dir.mkdir(parents=True, exist_ok=True)
    result = build_model(cache.resolve(), demo_dir)
    bundle, manifest = Path(result["bundle"]), Path(result["manifest"])
    study_dir, subject, label = held_out_study(manifest)
    files = sorted(study_dir.glob("*.dcm"))
    eyes = {path.name.split("_")[-1].removesuffix(".dcm") for path in files}
    with ExitStack() as stack:
        print("[2/5] starting the destination PACS (DCMTK storescp) and grok-pacs serve", flush=True)
        pacs = start_pacs(stack, demo_dir / "pacs")
        grok = start_serve(stack, bundle, demo_dir / "data", pacs, demo_dir / "serve.log")
        print(f"[3/5] C-STORE {len(files)} instances to {grok}", flush=True)
        results = store_files(grok, files, calling_ae="DEMO_MODALITY")
        failed = [r for r in results if not r.ok]
        if failed:
            raise RuntimeError(f"C-STORE failed: {[(str(r.path), r.status_name) for r in failed]}")
        import pydicom

        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        print(
            f"sent study {study_uid} of held-out phantom subject {subject} (the first test-split subject; "
            f"true label {label})",
            flush=True,
        )
        print(f"[4/5] waiting for {len(eyes)} SRs (one per eye) at {pacs}", flush=True)
        srs = wait_for_srs(demo_dir / "pacs", len(eyes))
    print("[5/5] the SRs as the PACS received them:\n", flush=True)
    for path in srs:
        print(render(path))
        print(f"(file: {path})\n")
    print("Files:")
    print(f"  bundle:        {bundle}")
    print(f"  cohort:        {manifest}")
    print(f"  grok data dir: {demo_dir / 'data'} (incoming/, index.sqlite, sr/)")
    print(f"  serve log:     {demo_dir / 'serve.log'}")
    for path in srs:
        print(f"SR: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demo-dir", type=Path, default=Path(".demo"), help="where the demo writes (default .demo)")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(".cache") / "pipeline",
        help="training pipeline cache (default .cache/pipeline)",
    )
    args = parser.parse_args(argv)
    return run(args.demo_dir, args.cache)


if __name__ == "__main__":
    sys.exit(main())
