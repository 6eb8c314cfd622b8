"""Fit the temperature that calibrates a bundle's label probabilities, and store it in the bundle.

    python -m training.calibration BUNDLE COHORT_MANIFEST [--split val]

runs the bundle's engine on the split's eyes, fits T by minimising the negative log-likelihood of the true
labels under softmax(log s / T) (grid over log T, then golden-section refinement), reports the expected
calibration error (ECE, 15 equal-width confidence bins) before and after, and writes `calibration.json`
into the bundle with its manifest entry and sha256 (grok_pacs.analysis.calibration applies it at run time).
A calibrated bundle behaves differently: give it a new version (`--version`).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from grok_pacs.analysis.bundle import MANIFEST, load_bundle, sha256_file
from grok_pacs.analysis.calibration import CALIBRATION_FILE, Calibration


def _matrix(scores: Sequence[dict[str, float]], labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if not scores or len(scores) != len(labels):
        raise ValueError(f"need one score dict per true label, got {len(scores)} and {len(labels)}")
    names = list(scores[0])
    if any(set(s) != set(names) for s in scores) or any(label not in names for label in labels):
        raise ValueError("every score dict must cover the same labels, and every true label must be one of them")
    logp = np.log(np.maximum(np.array([[s[n] for n in names] for s in scores], np.float64), 1e-12))
    return logp, np.array([names.index(label) for label in labels]), names


def _nll(logp: np.ndarray, truth: np.ndarray, temperature: float) -> float:
    z = logp / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_softmax[np.arange(len(truth)), truth].mean())


def fit_temperature(scores: Sequence[dict[str, float]], labels: Sequence[str]) -> float:
    """The temperature in [0.05, 100] (the range grok_pacs.analysis.calibration accepts) that minimises the
    validation NLL of the true labels."""
    logp, truth, _ = _matrix(scores, labels)
    grid = np.exp(np.linspace(math.log(0.05), math.log(100.0), 71))
    best = int(np.argmin([_nll(logp, truth, t) for t in grid]))
    lo, hi = math.log(grid[max(best - 1, 0)]), math.log(grid[min(best + 1, len(grid) - 1)])
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):  # golden section on log T inside the best grid cell's neighbours
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if _nll(logp, truth, math.exp(a)) < _nll(logp, truth, math.exp(b)):
            hi = b
        else:
            lo = a
    return float(math.exp((lo + hi) / 2))


def expected_calibration_error(scores: Sequence[dict[str, float]], labels: Sequence[str], bins: int = 15) -> float:
    """ECE of the top label: sum over confidence bins of |accuracy - mean confidence| x bin share."""
    logp, truth, _ = _matrix(scores, labels)
    probs = np.exp(logp)
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    correct = (predicted == truth).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def calibrate(scores: Sequence[dict[str, float]], labels: Sequence[str], fitted_on: str) -> Calibration:
    """Fit T and measure ECE before and after on the same eyes."""
    temperature = fit_temperature(scores, labels)
    cal = Calibration(temperature=temperature, fitted_on=fitted_on, n=len(labels))
    return Calibration(
        temperature=temperature,
        fitted_on=fitted_on,
        n=len(labels),
        ece_before=expected_calibration_error(scores, labels),
        ece_after=expected_calibration_error([cal.apply(s) for s in scores], labels),
    )


def add_to_bundle(bundle_dir: str | Path, calibration: Calibration, version: str | None = None) -> Path:
    """Write calibration.json into the bundle, list and hash it in the manifest (and set `version`)."""
    root = Path(bundle_dir)
    load_bundle(root)  # only a verified bundle is extended
    path = root / CALIBRATION_FILE
    path.write_text(json.dumps(calibration.to_dict(), indent=2) + "\n", encoding="utf-8")
    manifest_path = root / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["calibration"] = {"file": CALIBRATION_FILE, "method": calibration.method}
    manifest["files"][CALIBRATION_FILE] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    if version is not None:
        manifest["version"] = version
    manifest_path.write_text(json.dumps(manifest, indent=2))
    load_bundle(root)  # the runtime's verification, again
    return path


def calibrate_bundle(
    bundle_dir: Path,
    manifest: Path,
    split: str = "val",
    *,
    max_subjects: int = 0,
    version: str | None = None,
    progress: bool = False,
) -> Calibration:
    """Run the bundle on the cohort split's eyes (the first `max_subjects` subjects, 0 = all), fit the
    temperature and store it in the bundle."""
    from grok_pacs.analysis.engine import Engine
    from training.manifest import load_manifest
    from training.stage3.evaluate import predict
    from training.stage3.features import eye_id

    records = [r for r in load_manifest(manifest) if r.split == split]
    if max_subjects:
        chosen = set(list(dict.fromkeys(r.subject_id for r in records))[:max_subjects])
        records = [r for r in records if r.subject_id in chosen]
    if not records:
        raise ValueError(f"no {split!r} eyes in {manifest}")
    engine = Engine.from_bundle(bundle_dir)
    if engine.calibration is not None:
        raise ValueError(f"{bundle_dir} is already calibrated (T={engine.calibration.temperature:.3f})")
    _, reports, _ = predict(engine, manifest, [eye_id(r.subject_id, r.eye) for r in records], progress)
    scores = [report.label_scores for report in reports]
    cal = calibrate(scores, [r.label.value for r in records], f"{Path(manifest).name} {split} split")
    add_to_bundle(bundle_dir, cal, version)
    return cal


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(prog="python -m training.calibration", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("manifest", type=Path, help="cohort manifest (training.manifest format)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--version", help="new bundle version for the calibrated bundle")
    args = parser.parse_args(argv)
    try:
        cal = calibrate_bundle(args.bundle, args.manifest, args.split, version=args.version, progress=True)
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps(cal.to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
