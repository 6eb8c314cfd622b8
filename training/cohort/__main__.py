"""`python -m training.cohort from-dicom EXPORT_DIR --labels labels.csv --out DIR` and
`python -m training.cohort from-reviews --data-dir DIR --out DIR`: docs/training.md."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from grok_pacs.config import SettingsError, load_settings
from grok_pacs.store.blobs import BlobStoreUnavailable
from training.cohort.from_dicom import BuildResult, BuildSettings, NoUsableEyeError, build_from_dicom
from training.cohort.from_reviews import ReviewBuildSettings, build_from_reviews
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
    _add_from_reviews(sub)
    return parser.parse_args(argv)


def _add_from_reviews(sub: argparse._SubParsersAction) -> None:
    reviews = sub.add_parser(
        "from-reviews",
        help="from the clinicians' reviews in grok-pacs' results register",
        description="Every eye a clinician reviewed (accepted or corrected; a rejection with the right label) "
        "becomes a manifest row with the clinician's label and the CFP and OCT the result used, read from "
        "grok-pacs' data directory or object store; pseudonymised and split by subject as from-dicom does. "
        "Every reviewed result not used is listed with its reason (stdout and OUT/cohort-report.json).",
    )
    reviews.add_argument(
        "--config", type=Path, help="grok-pacs' TOML settings (database_url, data_dir, storage_url); else GROK_PACS_*"
    )
    reviews.add_argument("--data-dir", type=Path, help="grok-pacs' data directory (overrides the settings')")
    reviews.add_argument("--out", type=Path, required=True, help="a new (or empty) output folder")
    reviews.add_argument(
        "--salt-file",
        type=Path,
        default=DEFAULT_SALT_FILE,
        help="the pseudonymisation secret: the one from-dicom used gives a patient the same pseudonym in both "
        f"cohorts; created when absent; must be outside --out (default {DEFAULT_SALT_FILE})",
    )
    reviews.add_argument("--seed", type=int, default=0, help="the train/val/test split's seed")
    reviews.add_argument("--val-fraction", type=float, default=0.15, help="validation share of each label's subjects")
    reviews.add_argument("--test-fraction", type=float, default=0.15, help="test share of each label's subjects")
    reviews.add_argument("--copy", action="store_true", help="copy the images instead of hard-linking them")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = _from_reviews(args) if args.command == "from-reviews" else _from_dicom(args)
    except (ValueError, ManifestError, SettingsError, BlobStoreUnavailable) as exc:  # say why, write nothing more
        if isinstance(exc, NoUsableEyeError):
            print(table(exc.unused))
        print(f"{args.command}: {exc}", file=sys.stderr)
        return 2
    print(table(result.unused))
    print(json.dumps(result.counts, indent=1))
    print(f"manifest: {result.manifest}\nreport:   {result.report}")
    return 0


def _from_dicom(args: argparse.Namespace) -> BuildResult:
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
    return build_from_dicom(settings)


def _from_reviews(args: argparse.Namespace) -> BuildResult:
    settings = ReviewBuildSettings(
        runtime=load_settings(args.config, data_dir=args.data_dir),
        out_dir=args.out,
        salt_file=args.salt_file,
        seed=args.seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        copy=args.copy,
    )
    return build_from_reviews(settings)


if __name__ == "__main__":
    sys.exit(main())
