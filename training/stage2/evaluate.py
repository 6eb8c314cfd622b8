"""Stage-2 evaluation: does alignment make the frozen encoder's pooled feature carry the biomarkers?

A ridge probe (training/stage2/probe.py) is fitted on the *train* split's features and scored on the *test*
split only (subjects never seen in training or probe fitting), for the aligned encoder and for the plain
one (the same initial weights, untrained). MAE and RMSE per biomarker, in units and standardised by the
training SD, plus a predict-the-training-mean baseline, go to `eval.json` and `eval.md`. The aligned
encoder's probe is also saved as the runtime's biomarker head (`grok_pacs.model.heads` format).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from grok_pacs.domain.biomarkers import BY_KEY
from grok_pacs.model.heads import BiomarkerHead, head_input
from grok_pacs.model.vit import RetinaEncoder
from training.stage2.data import Stage2Data
from training.stage2.probe import RidgeProbe, fit_ridge, probe_errors

ENCODERS = ("aligned", "plain")


@dataclass(frozen=True)
class ProbeSettings:
    """How the encoders are probed (Stage2Config's ridge_alphas, seed, eval_batch_size, bf16, modality,
    head_grid): ridge alphas tried by subject-grouped CV with `seed`, features in batches of `batch_size`
    (bf16 on CUDA only), the head's token `grid` (0: the pooled feature alone); `modality` names the report."""

    alphas: tuple[float, ...]
    seed: int
    batch_size: int
    bf16: bool
    modality: str
    grid: int = 0


@torch.no_grad()
def pooled_features(
    encoder: RetinaEncoder, images: torch.Tensor, device: torch.device, batch_size: int, bf16: bool = False
) -> np.ndarray:
    """[N, D] float64 pooled features of the frozen encoder (eval mode; training state restored)."""
    return head_features(encoder, images, device, batch_size, bf16, grid=0)


def head_features(
    encoder: RetinaEncoder, images: torch.Tensor, device: torch.device, batch_size: int, bf16: bool, grid: int
) -> np.ndarray:
    """[N, F] float64 inputs of a biomarker head with `grid` (grok_pacs.model.heads.head_input): the pooled
    feature, then the mean token of each grid cell, from the frozen encoder (eval mode; state restored)."""
    was_training = encoder.training
    encoder.eval()
    out = []
    use_bf16 = bf16 and device.type == "cuda"
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device, torch.float32)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                tokens, pooled = encoder(batch)
            out.append(head_input(pooled.float().cpu(), tokens.float().cpu() if grid else None, grid))
    encoder.train(was_training)
    return np.concatenate(out)


def fit_probe(data: Stage2Data, features: np.ndarray, alphas: tuple[float, ...], seed: int) -> RidgeProbe:
    """Ridge probe fitted on the train split's rows only."""
    rows = data.rows("train").numpy()
    if rows.size < 2:
        raise ValueError(f"the probe needs at least 2 training eyes, the cohort has {rows.size}")
    return fit_ridge(
        features[rows], data.values[rows].double().numpy(), data.keys, np.array(data.subjects)[rows], alphas, seed
    )


def score_split(data: Stage2Data, probe: RidgeProbe, features: np.ndarray, split: str) -> dict:
    rows = data.rows(split).numpy()
    if rows.size == 0:
        raise ValueError(f"the cohort has no {split!r} eyes to evaluate on")
    return probe_errors(probe, features[rows], data.values[rows].double().numpy())


def mean_baseline(data: Stage2Data, probe: RidgeProbe) -> dict:
    """Errors of predicting every test eye as the training mean (what 'no information' scores)."""
    rows = data.rows("test").numpy()
    values = data.values[rows].double().numpy()
    err = values - probe.y_mean[None, :]
    mae = np.nanmean(np.abs(err), axis=0)
    rmse = np.sqrt(np.nanmean(err**2, axis=0))
    return {
        "mae": float(np.mean(mae)),
        "rmse": float(np.mean(rmse)),
        "mae_std": float(np.mean(mae / probe.y_scale)),
        "rmse_std": float(np.mean(rmse / probe.y_scale)),
    }


def evaluate_encoders(
    data: Stage2Data, encoders: dict[str, RetinaEncoder], device: torch.device, settings: ProbeSettings
) -> tuple[dict, dict[str, RidgeProbe]]:
    """The report (train-fitted, test-scored probes per encoder) and the fitted probes."""
    grid = settings.grid
    data.check_disjoint("train", "test")
    train_rows, test_rows = data.rows("train"), data.rows("test")
    report: dict = {
        "modality": settings.modality,
        "keys": list(data.keys),
        "n_train_eyes": len(train_rows),
        "n_test_eyes": len(test_rows),
        "n_train_subjects": len({data.subjects[i] for i in train_rows.tolist()}),
        "n_test_subjects": len({data.subjects[i] for i in test_rows.tolist()}),
        "probe": "ridge on standardised pooled features"
        + (f" and the mean tokens of a {grid}x{grid} grid" if grid else "")
        + ", alpha per biomarker by subject-grouped CV on train",
        "head_grid": grid,
        "encoders": {},
    }
    probes: dict[str, RidgeProbe] = {}
    for name, encoder in encoders.items():
        feats = head_features(encoder, data.images, device, settings.batch_size, settings.bf16, grid)
        probes[name] = fit_probe(data, feats, settings.alphas, settings.seed)
        report["encoders"][name] = score_split(data, probes[name], feats, "test")
        report["encoders"][name]["ridge_alphas"] = probes[name].alphas.tolist()
    report["baseline_train_mean"] = mean_baseline(data, next(iter(probes.values())))
    if {"aligned", "plain"} <= set(report["encoders"]):
        a, p = report["encoders"]["aligned"]["overall"], report["encoders"]["plain"]["overall"]
        report["aligned_minus_plain"] = {k: a[k] - p[k] for k in a}
        report["aligned_beats_plain"] = a["mae_std"] < p["mae_std"]
    return report, probes


def markdown_report(report: dict) -> str:
    """The report as a Markdown page: overall table, then per biomarker MAE/RMSE (units and standardised)."""
    enc = report["encoders"]
    names = [n for n in ENCODERS if n in enc]
    lines = [
        f"# Stage-2 linear probe: {report['modality']} biomarkers",
        "",
        f"Ridge probe fitted on {report['n_train_eyes']} training eyes ({report['n_train_subjects']} subjects), "
        f"scored on {report['n_test_eyes']} held-out test eyes ({report['n_test_subjects']} subjects).",
        "Standardised = divided by the biomarker's training standard deviation.",
        "",
        "| encoder | MAE | RMSE | MAE (std.) | RMSE (std.) |",
        "|---|---|---|---|---|",
    ]
    rows = [(n, enc[n]["overall"]) for n in names] + [("training mean (no image)", report["baseline_train_mean"])]
    for name, o in rows:
        lines.append(f"| {name} | {o['mae']:.3f} | {o['rmse']:.3f} | {o['mae_std']:.3f} | {o['rmse_std']:.3f} |")
    if "aligned_beats_plain" in report:
        verdict = "beats" if report["aligned_beats_plain"] else "does NOT beat"
        lines += [
            "",
            f"The aligned encoder {verdict} the plain one (overall standardised MAE "
            f"{enc['aligned']['overall']['mae_std']:.3f} vs {enc['plain']['overall']['mae_std']:.3f}).",
        ]
    header = " | ".join(f"{n} MAE | {n} RMSE" for n in names)
    lines += [
        "",
        "## Per biomarker (units)",
        "",
        f"| biomarker | unit | {header} |",
        "|---|---|" + "---|" * (2 * len(names)),
    ]
    for key in report["keys"]:
        if not all(key in enc[n]["per_biomarker"] for n in names):
            continue
        cells = " | ".join(
            f"{enc[n]['per_biomarker'][key]['mae']:.3f} | {enc[n]['per_biomarker'][key]['rmse']:.3f}" for n in names
        )
        lines.append(f"| {BY_KEY[key].name} | {BY_KEY[key].unit} | {cells} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    json_path, md_path = out_dir / "eval.json", out_dir / "eval.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown_report(report), encoding="utf-8")
    return json_path, md_path


def save_head(probe: RidgeProbe, modality: str, out_dir: Path, grid: int = 0) -> Path:
    """The probe as the runtime's biomarker head (one Linear in biomarker units on `head_input(.., grid)`)."""
    weight, bias = probe.as_linear()
    head = BiomarkerHead.from_ridge(modality, weight, bias, grid)
    return head.save(out_dir / f"{modality.lower()}-head.safetensors")
