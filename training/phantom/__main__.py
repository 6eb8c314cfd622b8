"""CLI: render a synthetic phantom cohort (python -m training.phantom --help)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from training.phantom.cohort import generate_cohort


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
    args = parser.parse_args(argv)
    if args.subjects < 1:
        parser.error("--subjects must be at least 1")
    start = time.monotonic()
    manifest = generate_cohort(args.out, args.subjects, args.seed, dicom=not args.no_dicom, workers=args.workers)
    print(f"wrote {manifest} ({args.subjects} subjects, {time.monotonic() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
