"""Fit a bundle's out-of-distribution check on its cohort and store it in the bundle.

    python -m training.ood BUNDLE --manifest COHORT/manifest.csv [--quantile 0.99] [--max-train-eyes 300]

Takes the bundle's own encoder pooled features (the runtime's preprocessing and ONNX sessions, no language
model) of the cohort's training eyes (the distribution) and validation eyes (the threshold: per modality
the `1 - (1 - quantile) / 2` quantile of their distances, so that about `quantile` of them pass on both),
and writes `ood.npz` into the bundle with its manifest entry and sha256
(grok_pacs.analysis.ood). Test eyes are never read. The pipeline runs it as the bundle's last step.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from export.bundle_files import add_file
from grok_pacs.analysis.bundle import load_bundle
from grok_pacs.analysis.imaging import read_cfp, read_oct_volume
from grok_pacs.analysis.onnx_session import create_session, run_encoder
from grok_pacs.analysis.ood import MODALITIES, OOD_FILE, FeatureDistribution, OodModel
from grok_pacs.analysis.preprocess import preprocess_cfp, preprocess_oct, select_foveal_bscan
from training.manifest import CohortRecord, load_manifest


class BundleFeatures:
    """The pooled features a bundle's encoders give, as the runtime computes them."""

    def __init__(self, bundle_dir: Path | str, threads: int = 1) -> None:
        bundle = load_bundle(bundle_dir)
        enc = bundle.manifest["encoders"]
        self.sessions = {
            "CFP": create_session(bundle.path(enc["cfp"]["file"]), "cpu", threads),
            "OCT": create_session(bundle.path(enc["oct"]["file"]), "cpu", threads),
        }

    def pooled(self, modality: str, pixels: np.ndarray) -> np.ndarray:
        """Pooled feature [D] of a CFP (uint8 RGB) or an OCT volume (its foveal B-scan)."""
        if modality == "CFP":
            return run_encoder(self.sessions["CFP"], preprocess_cfp(pixels)[None])[1][0]
        frame, _ = select_foveal_bscan(pixels)
        return run_encoder(self.sessions["OCT"], preprocess_oct(pixels[frame])[None])[1][0]

    def of_records(self, records: Sequence[CohortRecord]) -> dict[str, np.ndarray]:
        """modality -> [N, D] features of the records' eyes."""
        out: dict[str, list[np.ndarray]] = {m: [] for m in MODALITIES}
        for r in records:
            out["CFP"].append(self.pooled("CFP", read_cfp(r.cfp_path)))
            out["OCT"].append(self.pooled("OCT", read_oct_volume(r.oct_path)))
        return {m: np.stack(v) for m, v in out.items()}


def fit_ood(
    bundle_dir: Path | str, manifest: Path | str, quantile: float = 0.99, max_train_eyes: int = 300, seed: int = 0
) -> tuple[OodModel, dict]:
    """Distribution on (at most `max_train_eyes`, a seeded sample of) the training eyes, threshold on all
    validation eyes. Returns the model and a summary (eyes used, thresholds, validation pass rate)."""
    records = load_manifest(manifest)
    train = [r for r in records if r.split == "train"]
    val = [r for r in records if r.split == "val"]
    if len(train) < 3 or not val:
        raise ValueError(f"{manifest}: the OOD fit needs >= 3 training and >= 1 validation eyes")
    if len(train) > max_train_eyes:
        keep = np.random.default_rng(seed).permutation(len(train))[:max_train_eyes]
        train = [train[i] for i in sorted(keep.tolist())]
    features = BundleFeatures(bundle_dir)
    x_train, x_val = features.of_records(train), features.of_records(val)
    per_modality = 1 - (1 - quantile) / len(MODALITIES)  # an eye passes when both of its modalities pass
    model = OodModel({m: FeatureDistribution.fit(x_train[m], x_val[m], per_modality) for m in MODALITIES}, quantile)
    passed = [max(model.scores({m: x_val[m][i] for m in MODALITIES}).values()) <= 1.0 for i in range(len(val))]
    summary = {
        "train_eyes": len(train),
        "val_eyes": len(val),
        "quantile": quantile,
        "thresholds": {m: round(model.models[m].threshold, 3) for m in MODALITIES},
        "val_pass_rate": round(float(np.mean(passed)), 4),
    }
    return model, summary


def add_to_bundle(bundle_dir: Path | str, model: OodModel) -> Path:
    """Write ood.npz into the bundle, list and hash it in the manifest, verify the bundle again."""
    return add_file(bundle_dir, OOD_FILE, model.save, "ood", {"quantile": model.quantile})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.ood", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--manifest", type=Path, required=True, help="the cohort the bundle was trained on")
    parser.add_argument("--quantile", type=float, default=0.99)
    parser.add_argument("--max-train-eyes", type=int, default=300)
    args = parser.parse_args(argv)
    model, summary = fit_ood(args.bundle, args.manifest, args.quantile, args.max_train_eyes)
    add_to_bundle(args.bundle, model)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
