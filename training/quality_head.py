"""Train the learned quality head on a bundle's encoders and store it in the bundle.

    python -m training.quality_head BUNDLE [--eyes 42] [--seed 0] [--version V]

Renders phantom eyes (training.phantom), makes one degraded copy of each image (training.benchmark.safety:
blur, exposure, small pupil, off-centre, blank; OCT low signal, blank), takes the bundle's encoder pooled
features (the runtime's preprocessing and ONNX sessions), fits one L2-regularised logistic model per
modality (clean = 0, degraded = 1; 70/30 split by eye), reports the held-out AUROC, and writes
`quality_head.npz` into the bundle with its manifest entry and sha256 (grok_pacs.analysis.quality_head).
Phantom degradations only: on real images its worth is unmeasured.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from export.bundle_files import add_file
from grok_pacs.analysis.quality_head import QUALITY_HEAD_FILE, LogisticModel, QualityHead
from training.benchmark.safety import CFP_DEGRADATIONS, OCT_DEGRADATIONS, auroc, phantom_eyes


def fit_logistic(features: np.ndarray, targets: np.ndarray, l2: float = 1.0, steps: int = 500) -> LogisticModel:
    """Standardised features, gradient descent on the mean log-loss + l2/n * |w|^2 (deterministic)."""
    x = np.asarray(features, np.float64)
    y = np.asarray(targets, np.float64)
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - mean) / scale
    w, b = np.zeros(z.shape[1]), 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w + b, -50, 50)))
        w -= 0.5 * (z.T @ (p - y) / len(y) + 2 * l2 * w / len(y))
        b -= 0.5 * float((p - y).mean())
    return LogisticModel(mean, scale, w, b)


def degraded_features(engine, eyes: Sequence[tuple[np.ndarray, np.ndarray]], seed: int) -> dict:
    """modality -> (features [2N, D], targets [2N], eye index [2N]) for clean and degraded images."""
    rng = np.random.default_rng(seed)
    out = {}
    for modality, index, kinds in (("CFP", 0, CFP_DEGRADATIONS), ("OCT", 1, OCT_DEGRADATIONS)):
        names = list(kinds)
        feats, targets, owners = [], [], []
        for i, eye in enumerate(eyes):
            image = eye[index]
            for target, pixels in ((0, image), (1, kinds[names[i % len(names)]](image, rng))):
                feats.append(engine.pooled_feature(modality, pixels))
                targets.append(target)
                owners.append(i)
        out[modality] = (np.stack(feats), np.array(targets), np.array(owners))
    return out


def train_head(engine, eyes: Sequence[tuple[np.ndarray, np.ndarray]], seed: int = 0) -> tuple[QualityHead, dict]:
    """Fit per modality on 70% of the eyes, AUROC on the rest, then refit on all eyes for the bundle."""
    models, report = {}, {}
    held_out = set(np.random.default_rng(seed).permutation(len(eyes))[: max(1, int(0.3 * len(eyes)))].tolist())
    for modality, (x, y, owner) in degraded_features(engine, eyes, seed).items():
        test = np.array([o in held_out for o in owner])
        model = fit_logistic(x[~test], y[~test])
        scores = [model.probability(f) for f in x[test]]
        report[modality] = {
            "held_out_auroc": auroc(scores, y[test].astype(bool)),
            "n_train": int((~test).sum()),
            "n_test": int(test.sum()),
        }
        models[modality] = fit_logistic(x, y)
    return QualityHead(models), report


def add_to_bundle(bundle_dir: str | Path, head: QualityHead, version: str | None = None) -> Path:
    """Write quality_head.npz into the bundle, list and hash it in the manifest (and set `version`)."""
    return add_file(bundle_dir, QUALITY_HEAD_FILE, head.save, "quality_head", {"threshold": head.threshold}, version)


def main(argv: list[str] | None = None) -> int:
    from grok_pacs.analysis.engine import Engine

    parser = argparse.ArgumentParser(prog="python -m training.quality_head", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--eyes", type=int, default=42)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--version")
    args = parser.parse_args(argv)
    head, report = train_head(Engine.from_bundle(args.bundle), phantom_eyes(args.eyes, args.seed), args.seed)
    add_to_bundle(args.bundle, head, args.version)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
