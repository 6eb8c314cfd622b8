"""Benchmark: calibration and the learned quality head on a trained phantom bundle (issue 15).

Runs the bundle's engine on the cohort's test eyes (through the runtime, as served; both eyes of a subject as
one study) and reports their expected calibration error before and after the temperature (the bundle's own,
fitted by the pipeline on validation subjects; for an uncalibrated bundle one is fitted here on the
validation eyes: training.benchmark.honesty.held_out_calibration), the referral sensitivity/specificity of the
test eyes' dispositions against the dispositions their true labels and biomarkers call for
(training.benchmark.safety.referral_figures); trains
the learned quality head on the bundle's encoders (training.quality_head, phantom images and degraded
copies) and reports its held-out AUROC. The bundle is copied, never modified.
Writes bench/results/calibration.json.
Usage: python -m bench.calibration --bundle .cache/pipeline/bundle-*/bundle --manifest
.cache/pipeline/cohort-*/manifest.csv
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from grok_pacs.analysis.engine import Engine
from training.benchmark.honesty import held_out_calibration
from training.benchmark.safety import phantom_eyes, referral_figures
from training.manifest import load_manifest
from training.quality_head import train_head
from training.stage3.evaluate import predict
from training.stage3.features import eye_id

RESULTS = Path(__file__).resolve().parent / "results" / "calibration.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--head-eyes", type=int, default=42)
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(shutil.copytree(args.bundle, Path(tmp) / "bundle"))
        engine = Engine.from_bundle(bundle)
        records = load_manifest(args.manifest)
        test_records = [r for r in records if r.split == "test"]
        _, test_reports, _ = predict(engine, args.manifest, [eye_id(r.subject_id, r.eye) for r in test_records])
        calibration = held_out_calibration(
            engine,
            [r for r in records if r.split == "val"],
            [r.label_scores for r in test_reports],
            [r.label.value for r in test_records],
        )
        referral = referral_figures(
            test_reports, [r.label.value for r in test_records], [r.biomarkers for r in test_records]
        )
        _, head = train_head(engine, phantom_eyes(args.head_eyes, 11), seed=11)
    result = {
        "bundle": f"{engine.bundle.name} {engine.bundle.version}",
        "calibration": calibration,
        "referral": referral,
        "quality_head": head,
        "wall_s": round(time.perf_counter() - start, 1),
        "data": "synthetic phantom cohort (training.phantom); no real images",
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
