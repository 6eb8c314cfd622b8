"""Measure a bundle's typical biomarker estimate error on its validation eyes and store it in the bundle.

    python -m training.estimate_error BUNDLE --manifest COHORT/manifest.csv [--quantile 0.9]

Runs the bundle's encoders and heads as the runtime does (grok_pacs.analysis.engine, no generation) on the
cohort's validation eyes, compares each estimate with the measured value in the manifest, and writes the
`quantile` of the absolute errors per biomarker to `estimate_error.json` with its manifest entry and sha256
(grok_pacs.analysis.estimate_error says what reads it). The quantile is fixed (0.9: nine estimates in ten
lie closer), not tuned on any outcome. Test eyes are never read. The pipeline runs it in the bundle step.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from export.bundle_files import add_file
from grok_pacs.analysis.estimate_error import ERROR_FILE, EstimateErrors
from grok_pacs.analysis.imaging import read_cfp, read_oct_volume
from training.manifest import load_manifest

DEFAULT_QUANTILE = 0.9


def fit_estimate_errors(
    bundle_dir: Path | str, manifest: Path | str, quantile: float = DEFAULT_QUANTILE
) -> EstimateErrors:
    """The quantile of |estimate - measured| per biomarker over the validation eyes (see the module docstring)."""
    from grok_pacs.analysis.engine import Engine

    val = [r for r in load_manifest(manifest) if r.split == "val"]
    if not val:
        raise ValueError(f"{manifest}: no validation eyes to measure the estimate error on")
    engine = Engine.from_bundle(bundle_dir, device="cpu")
    gaps: dict[str, list[float]] = {}
    for record in val:
        estimates = engine.biomarker_estimates(read_cfp(record.cfp_path), read_oct_volume(record.oct_path))
        for key, value in estimates.items():
            measured = record.biomarkers.get(key)
            if measured is not None and math.isfinite(measured) and math.isfinite(value):
                gaps.setdefault(key, []).append(abs(value - measured))
    errors = {key: round(float(np.quantile(found, quantile)), 4) for key, found in gaps.items()}
    return EstimateErrors(quantile, len(val), errors)


def add_to_bundle(bundle_dir: Path | str, errors: EstimateErrors) -> Path:
    """Write estimate_error.json into the bundle, list and hash it in the manifest, verify the bundle again."""
    return add_file(bundle_dir, ERROR_FILE, errors.save, "estimate_error", {"quantile": errors.quantile})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.estimate_error", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--manifest", type=Path, required=True, help="the cohort the bundle was trained on")
    parser.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE)
    args = parser.parse_args(argv)
    errors = fit_estimate_errors(args.bundle, args.manifest, args.quantile)
    add_to_bundle(args.bundle, errors)
    print(json.dumps(errors.to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
