"""`python -m training.cohort from-dicom EXPORT_DIR --labels labels.csv --out DIR`: docs/training.md."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from training.cohort.from_dicom import BuildSettings, NoUsableEyeError, build_from_dicom
from training.cohort.pseudonym import DEFAULT_SALT_FILE
from training.cohort.report import table
from training.manifest import ManifestError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.cohort", description="Build a cohort manifest.")
    sub = parser.add_subparsers(dest="command", required=True)
    dicom = sub.add_parser(
        "from-dicom",
        help="from a PACS export of OP (CFP) and OPT (OCT) studies and a labels CSV",
        description="Pair one CFP with one OCT per eye and visit, label, pseudonymise, split by subject and write "
        "OUT/manifest.csv; every file or CSV row not used is listed with its reason (stdout and "
        "OUT/cohort-report.json). Format: docs/cohort-manifest.md.",
    )
    dicom.add_argument("export_dir", type=Path, help="the export: DICOM files in any folder layout")
    dicom.add_argument("--labels", type=Path, required=True, help="CSV: patient_id, eye (R/L, empty = both), label")
    dicom.add_argument("--measurements", type=Path, help="CSV: patient_id, eye, biomarker keys (empty = not measured)")
    dicom.add_argument("--out", type=Path, required=True, help="a new (or empty) output folder")
    dicom.add_argument(
        "--salt-file",
        type=Path,
        default=DEFAULT_SALT_FILE,
        help=f"the pseudonymisation secret, created when absent; must be outside --out (default {DEFAULT_SALT_FILE})",
    )
    dicom.add_argument("--max-days", type=int, default=30, help="most days between a CFP and the OCT it pairs with")
    dicom.add_argument("--seed", type=int, default=0, help="the train/val/test split's seed")
    dicom.add_argument("--val-fraction", type=float, default=0.15, help="validation share of each label's subjects")
    dicom.add_argument("--test-fraction", type=float, default=0.15, help="test share of each label's subjects")
    dicom.add_argument("--copy", action="store_true", help="copy the images instead of hard-linking them")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = BuildSettings(
        export_dir=args.export_dir,
        labels=args.labels,
        out_dir=args.out,
        salt_file=args.salt_file,
        measurements=args.measurements,
        max_days=args.max_days,
        seed=args.seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        copy=args.copy,
    )
    try:
        result = build_from_dicom(settings)
    except (ValueError, ManifestError) as exc:  # unusable inputs: say why, write nothing more
        if isinstance(exc, NoUsableEyeError):
            print(table(exc.unused))
        print(f"from-dicom: {exc}", file=sys.stderr)
        return 2
    print(table(result.unused))
    print(json.dumps(result.counts, indent=1))
    print(f"manifest: {result.manifest}\nreport:   {result.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
