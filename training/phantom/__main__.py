"""CLI: render a synthetic phantom cohort (python -m training.phantom --help)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from training.phantom.cohort import generate_cohort
from training.phantom.devices import DEVICES, HELD_OUT_DEVICES, REFERENCE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.phantom",
        description="Render a SYNTHETIC phantom cohort: per subject one of the 7 labels, both eyes, a colour fundus "
        "photograph and an OCT volume rendered from label-conditioned biomarkers, as PNG and (unless "
        "--no-dicom) as one DICOM study (OP JPEG baseline + multi-frame OPT per eye). Writes "
        "OUT/manifest.csv (format: docs/cohort-manifest.md). Same seed, same files. Not clinical data.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--subjects", type=int, default=500, help="number of subjects (default 500; labels balanced)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--no-dicom", action="store_true", help="write PNG only, no DICOM studies")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--device",
        default=REFERENCE,
        help=f"acquisition device(s), comma-separated, shared among the subjects (default {REFERENCE}; known: "
        f"{', '.join(DEVICES)}). A held-out device ({', '.join(HELD_OUT_DEVICES)}) renders an all-test "
        "evaluation cohort on its own.",
    )
    args = parser.parse_args(argv)
    if args.subjects < 1:
        parser.error("--subjects must be at least 1")
    devices = tuple(name.strip() for name in args.device.split(",") if name.strip())
    start = time.monotonic()
    try:
        manifest = generate_cohort(
            args.out, args.subjects, args.seed, dicom=not args.no_dicom, workers=args.workers, devices=devices
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(f"wrote {manifest} ({args.subjects} subjects, {time.monotonic() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
