"""Calibrate a stage-3 bundle: run its engine on a cohort split's eyes and hand their scores to the fit.

    python -m training.stage3.calibrate BUNDLE COHORT_MANIFEST [--split val] [--method temperature+uniform]

The predictions come from `training.stage3.evaluate.predict` (the runtime engine, as the benchmark runs
it); `training.calibration` fits T and the uniform share on them and stores the result in the bundle. A
calibrated bundle behaves differently: give it a new version (`--version`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from grok_pacs.analysis.engine import Engine
from grok_pacs.analysis.label_calibration import METHODS, Calibration
from training import calibration
from training.manifest import load_manifest
from training.stage3.evaluate import predict
from training.stage3.features import eye_id

#: Eyes a generation while fitting: only the scores count here. On 2 cores an eye costs 7.0 s two a batch, 5.4 s
#: eight, 4.5 s sixteen and 4.3 s twenty-eight (fp32; the prompts' prefill is most of what is left).
CALIBRATION_BATCH_EYES = 16


def calibrate_bundle(
    bundle_dir: Path,
    manifest: Path,
    split: str = "val",
    *,
    max_subjects: int = 0,
    method: str = calibration.DEFAULT_METHOD,
    version: str | None = None,
    progress: bool = False,
) -> Calibration:
    """Run the bundle on the cohort split's eyes (the first `max_subjects` subjects, 0 = all), fit the
    calibration and store it in the bundle; the eyes' raw scores go to `<bundle>.calibration_fit.json`."""
    records = [r for r in load_manifest(manifest) if r.split == split]
    if max_subjects:
        chosen = set(list(dict.fromkeys(r.subject_id for r in records))[:max_subjects])
        records = [r for r in records if r.subject_id in chosen]
    if not records:
        raise ValueError(f"no {split!r} eyes in {manifest}")
    engine = Engine.from_bundle(bundle_dir)
    if engine.calibration is not None:
        raise ValueError(f"{bundle_dir} is already calibrated (T={engine.calibration.temperature:.3f})")
    cases = [eye_id(r.subject_id, r.eye) for r in records]
    _, reports, _ = predict(engine, manifest, cases, progress, batch_eyes=CALIBRATION_BATCH_EYES)
    return calibration.calibrate_bundle(
        bundle_dir,
        cases,
        # the language model's own scores (label_scores are the decision classifier's when the bundle has one)
        [report.uncalibrated_scores for report in reports],
        [r.label.value for r in records],
        f"{Path(manifest).name} {split} split",
        method=method,
        version=version,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.stage3.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("manifest", type=Path, help="cohort manifest (training.manifest format)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--method", choices=METHODS, default=calibration.DEFAULT_METHOD, help="default: %(default)s")
    parser.add_argument("--version", help="new bundle version for the calibrated bundle")
    args = parser.parse_args(argv)
    try:
        cal = calibrate_bundle(
            args.bundle, args.manifest, args.split, method=args.method, version=args.version, progress=True
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps(cal.to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
