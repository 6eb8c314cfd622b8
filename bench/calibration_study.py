"""Calibration study on a calibrated phantom bundle: the raw label scores of every validation and test eye; the
temperature fitted on the first 32 validation eyes (what the pipeline does) or on all of them, by plain NLL or
with Laplace-smoothed targets; the test ECE and mean confidence of each.

    python bench/calibration_study.py BUNDLE MANIFEST   # writes bench/results/calibration_study_phantom.json
"""

import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from grok_pacs.analysis.calibration import Calibration
from grok_pacs.analysis.engine import Engine
from training.calibration import _matrix, expected_calibration_error, fit_temperature
from training.manifest import load_manifest
from training.stage3.evaluate import predict
from training.stage3.features import eye_id

bundle, manifest = Path(sys.argv[1]), Path(sys.argv[2])
engine = Engine.from_bundle(bundle)
engine.calibration = None  # raw scores: what the bundle step fits on
recs = load_manifest(manifest)
out = {}
for split in ("val", "test"):
    rs = [r for r in recs if r.split == split]
    _, reports, per_eye = predict(engine, manifest, [eye_id(r.subject_id, r.eye) for r in rs], True)
    out[split] = {
        "labels": [r.label.value for r in rs],
        "scores": [rep.label_scores for rep in reports],
        "s_per_eye": per_eye,
    }


def apply(scores, t):
    """The runtime's calibration (grok_pacs.analysis.calibration) at temperature t."""
    return [Calibration(temperature=t).apply(s) for s in scores]


def fit_smoothed(scores, labels):
    logp, truth, names = _matrix(scores, labels)
    n, k = logp.shape
    eps = 1.0 / (n + 2)  # Laplace: an error-free set of n still leaves 1/(n+2) of doubt
    target = np.full((n, k), eps / (k - 1))
    target[np.arange(n), truth] = 1 - eps
    best = None
    for t in np.exp(np.linspace(math.log(0.05), math.log(100), 400)):
        z = logp / t
        z -= z.max(1, keepdims=True)
        ls = z - np.log(np.exp(z).sum(1, keepdims=True))
        loss = float(-(target * ls).sum(1).mean())
        if best is None or loss < best[0]:
            best = (loss, t)
    return float(best[1])


val, test = out["val"], out["test"]
vs, vl, ts, tl = val["scores"], val["labels"], test["scores"], test["labels"]
first32 = 32
res = {
    "n_val": len(vl),
    "val_errors": sum(max(s, key=s.get) != truth for s, truth in zip(vs, vl)),
    "test_errors": sum(max(s, key=s.get) != truth for s, truth in zip(ts, tl)),
    "test_ece_raw": expected_calibration_error(ts, tl),
}
for name, (s, labels) in {"first32": (vs[:first32], vl[:first32]), "all_val": (vs, vl)}.items():
    for how, fit in (("nll", fit_temperature), ("laplace", fit_smoothed)):
        t = fit(s, labels)
        res[f"T_{name}_{how}"] = t
        res[f"test_ece_{name}_{how}"] = expected_calibration_error(apply(ts, t), tl)
        res[f"test_mean_conf_{name}_{how}"] = float(np.mean([max(p.values()) for p in apply(ts, t)]))
Path(__file__).resolve().parent.joinpath("results", "calibration_study_phantom.json").write_text(
    json.dumps(res, indent=1) + "\n"
)
print(json.dumps(res, indent=1))
