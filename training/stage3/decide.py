"""Stage 3's served estimates and decision classifier: what the SFT prompts carry besides the images.

`head_estimates` is every eye's biomarker estimates from the stage-2 heads, as the runtime serves them;
`fit_decision` fits the decision classifier (training.stage3.crossfit) on the training eyes and gives every
record its decided label. Apart from `run` because they are the prompt's inputs, not the training loop, and
`bench.decision_classifier` uses the estimates without training anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from grok_pacs.domain.biomarkers import CFP_KEYS, OCT_KEYS
from grok_pacs.model.decision import DECISION_FILE
from grok_pacs.model.heads import BiomarkerHead, estimates_in_range, head_input
from training.stage3.config import Stage3Config
from training.stage3.crossfit import fit_decision_classifier
from training.stage3.data import record_label
from training.stage3.features import FeatureStore, eye_id
from training.stage3.result import Stage3Inputs


def _head_values(head: BiomarkerHead, pooled: torch.Tensor, tokens: torch.Tensor, chunk: int = 256) -> np.ndarray:
    """[N, K] head outputs for every row of the store (in chunks: the tokens in float64 would be large)."""
    parts = [
        head.predict(head_input(pooled[i : i + chunk], tokens[i : i + chunk].float() if head.grid else None, head.grid))
        for i in range(0, len(pooled), chunk)
    ]
    return np.concatenate(parts)


def head_estimates(store: FeatureStore, cfp_head: Path, oct_head: Path) -> dict[str, dict[str, float]]:
    """Every eye's biomarker estimates from the heads, clipped to the plausible ranges (as served)."""
    cfp_values = _head_values(BiomarkerHead.load(cfp_head), store.cfp_pooled, store.cfp)
    oct_values = _head_values(BiomarkerHead.load(oct_head), store.oct_pooled, store.oct)
    out = {}
    for row, rid in enumerate(store.ids):
        values = dict(zip(OCT_KEYS, map(float, oct_values[row])))
        values.update(zip(CFP_KEYS, map(float, cfp_values[row])))
        out[rid] = estimates_in_range(values)
    return out


def fit_decision(
    cfg: Stage3Config,
    train: list[dict],
    served: dict[str, dict[str, float]],
    store: FeatureStore,
    inputs: Stage3Inputs,
    out_dir: Path,
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """The decision classifier (training.stage3.crossfit) saved as `decision.json` in `out_dir`; returns the
    estimates the SFT prompts carry (the served ones, every eye) and each record's
    decided label (training eyes: by a classifier that did not see them; validation eyes: the classifier's)."""
    from training.manifest import load_manifest

    records = {eye_id(r.subject_id, r.eye): r for r in load_manifest(inputs.manifest)}
    rows = [(str(r["id"]), records[str(r["id"])].subject_id, record_label(r)) for r in train]
    val = [(rid, r.label) for rid, r in records.items() if r.split == "val"]
    classifier, oof, decided = fit_decision_classifier(
        rows,
        val,
        served,
        store,
        {rid: r.biomarkers for rid, r in records.items()},
        {"CFP": inputs.cfp_head, "OCT": inputs.oct_head},
        target_error=cfg.decision_target_error,
        seed=cfg.seed,
    )
    classifier.save(out_dir / DECISION_FILE)
    for rid, values in served.items():
        if rid not in oof:
            decided[rid] = classifier.decide(values).label
    # The prompts' numbers stay the served estimates (the ones the guideline targets are written from and the
    # runtime validator checks against); only the label line comes from a classifier that did not see the eye.
    # Cross-fitted numbers in the prompts made the demo's LM write AMD subtypes its served estimates contradict
    # (a narrative withheld on PH7-00008), while the label line alone carries the realistic errors.
    return served, decided
