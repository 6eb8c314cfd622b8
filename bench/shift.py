"""Acquisition-device shift: fresh phantom eyes on each training device and on the held-out one, through a
demo-sized bundle and the runtime (gate, engine, device-shift check); trains nothing.

    .venv/bin/python -m bench.shift [--bundle DIR] [--manifest CSV] [--subjects 7] [--seed 61733]
                                    [--out bench/results/shift.json]

The bundle: `--bundle`, else the newest complete demo-sized (210-subject phantom) bundle in the pipeline cache
(.cache/pipeline). A bundle without an OOD model (grok_pacs.analysis.ood) or estimate errors
(grok_pacs.analysis.estimate_error) gets them fitted on a copy, from its
cohort's training and validation eyes (`--manifest`, else the cached phantom cohort of the bundle's seed):
fitting is a few seconds of encoder passes, not training. The eyes: `--subjects` subjects of a phantom seed
(`--seed`, one no other result uses) rendered on every device of training.phantom.devices; the same
anatomy on each, only the acquisition differs. Each device is marked as in the bundle's training cohort or
not (the demo trains on `reference` only: the other training devices are unseen by it too). Each eye passes
the rule-based gate (an ungradable modality is left out, as the study job does) and then the engine. Per
device: macro-F1 over all eyes (an eye with no stated label counts as a miss), the share of eyes with a wrong
stated label, the error among stated labels, the shares Indeterminate, ungradable and marked unlike the
training images, and referral by tier (urgent / ophthalmology / physician / rescreen, as the benchmark).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from grok_pacs.analysis.bundle import load_bundle
from grok_pacs.analysis.engine import Engine
from grok_pacs.analysis.imaging import EyeImages
from grok_pacs.analysis.quality import QualityThresholds, assess_cfp, assess_oct
from grok_pacs.analysis.result import Eye, Gradability
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label
from grok_pacs.report.dispositions import WITHIN_ERROR, first_match, for_eye
from training.benchmark import ledger
from training.benchmark.referral import OPHTHALMOLOGY, tier, tier_figures
from training.benchmark.safety import truth_dispositions
from training.cohort.fingerprint import code_commit
from training.phantom.cohort import plan_cohort, render_subject
from training.phantom.devices import DEVICES, REFERENCE, get_device

CACHE = Path(".cache") / "pipeline"
LEDGER = Path(__file__).resolve().parent / "results" / "ledger.json"
HEADLINE = ("macro_f1", "error_among_stated", "coverage")  #: per device, in the ledger
DEMO_SUBJECTS = 210
BATCH = 8  #: eyes per engine call (one batched generation)


def find_demo_bundle(cache: Path = CACHE) -> Path | None:
    """The newest complete bundle of a 210-subject phantom cohort in the pipeline cache, or None."""
    found = []
    for done in cache.glob("bundle-*/DONE.json"):
        bundle = Path(json.loads(done.read_text())["bundle"])
        manifest = json.loads((bundle / "manifest.json").read_text()) if (bundle / "manifest.json").is_file() else {}
        if manifest.get("provenance", {}).get("pipeline", {}).get("n_subjects") == DEMO_SUBJECTS:
            found.append((done.stat().st_mtime, bundle))
    return max(found)[1] if found else None


def cohort_manifest(bundle: Path, cache: Path = CACHE) -> Path:
    """The cached phantom cohort the bundle was trained on (same seed and subject count)."""
    pipeline = load_bundle(bundle, verify=False).manifest["provenance"]["pipeline"]
    for described in sorted(cache.glob("cohort-*/cohort.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        info = json.loads(described.read_text())
        if (info.get("seed"), info.get("n_subjects")) == (pipeline.get("seed"), pipeline.get("n_subjects")):
            if (described.parent / "DONE.json").is_file():
                return described.parent / "manifest.csv"
    raise FileNotFoundError(f"no cached cohort of seed {pipeline.get('seed')} for {bundle}: pass --manifest")


def with_fitted(bundle: Path, manifest: Path | None, work: Path) -> tuple[Path, dict]:
    """The bundle itself when it has an OOD model and estimate errors, else a copy with what it lacks fitted
    on its cohort's training and validation eyes (training.ood, training.estimate_error). Returns the bundle
    to serve and what was fitted here."""
    entries = load_bundle(bundle, verify=False).manifest
    if "ood" in entries and "estimate_error" in entries:
        return bundle, {}
    from training import estimate_error, ood

    copy, fitted = work / "bundle", {}
    shutil.copytree(bundle, copy)
    cohort = manifest or cohort_manifest(bundle)
    if "ood" not in entries:
        model, fitted["ood"] = ood.fit_ood(copy, cohort)
        ood.add_to_bundle(copy, model)
    if "estimate_error" not in entries:
        errors = estimate_error.fit_estimate_errors(copy, cohort)
        estimate_error.add_to_bundle(copy, errors)
        fitted["estimate_error"] = errors.to_dict()
    return copy, fitted


def training_devices(bundle: Path) -> set[str]:
    """The devices of the bundle's training cohort (its fingerprint's `meta_device` counts; a cohort from
    before devices existed was all `reference`)."""
    cohort = load_bundle(bundle, verify=False).manifest["provenance"].get("cohort", {})
    return set(cohort.get("devices") or {}) or {REFERENCE}


def gated(eye: Eye, cfp: np.ndarray, volume: np.ndarray, limits: QualityThresholds) -> EyeImages | None:
    """The eye's gradable images (as the study job passes them on), None when neither is gradable."""
    keep_cfp = assess_cfp(cfp, limits).gradability is Gradability.GRADABLE
    keep_oct = assess_oct(volume, limits).gradability is Gradability.GRADABLE
    if not keep_cfp and not keep_oct:
        return None
    return EyeImages(eye, cfp if keep_cfp else None, volume if keep_oct else None, (), {})


def macro_f1(truth: list[str], stated: list[str]) -> float:
    """Mean F1 over the labels that are true or stated for some eye (as scikit-learn's macro average); an eye
    stated Indeterminate (or ungradable) is a miss for its true label."""
    scores = []
    for label in (lab.value for lab in DIAGNOSTIC_LABELS):
        tp = sum(t == label and s == label for t, s in zip(truth, stated))
        fp = sum(t != label and s == label for t, s in zip(truth, stated))
        fn = sum(t == label and s != label for t, s in zip(truth, stated))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def run_device(engine: Engine, device: str, subjects: int, seed: int) -> dict:
    """Every eye of the fresh subjects on one device through gate and engine; the device's figures and rows."""
    limits = QualityThresholds()
    rows, batch, measured, reports = [], [], [], {}
    for plan in plan_cohort(subjects, seed):
        _, eyes = render_subject(replace(plan, device=device), seed)
        for rendered in eyes:
            item = gated(Eye(rendered.truth.eye), rendered.cfp, rendered.volume, limits)
            row = {"case": f"{plan.subject_id}/{rendered.truth.eye}", "truth": plan.label.value}
            rows.append(row)
            measured.append(rendered.truth.biomarkers)
            if item is None:
                row.update(stated="ungradable", ungradable=True, ood=False, shift_scores={})
            else:
                batch.append((row, item))
    for start in range(0, len(batch), BATCH):
        part = batch[start : start + BATCH]
        for (row, _), report in zip(part, engine.analyze_batch([item for _, item in part])):
            reports[row["case"]] = report
            row.update(
                stated=report.label.value,
                ungradable=False,
                ood=report.out_of_distribution,
                shift_scores=report.shift_scores,
                missing=list(report.missing_modalities),
                narrative=narrative_outcome(report),
            )
    referral = referral_by_tier(rows, measured, reports)
    return {"device": get_device(device).describe(), **summarise(rows), "referral": referral, "eyes": rows}


def referral_by_tier(rows: list[dict], measured: list[dict], reports: dict) -> dict | None:
    """Referral by tier (training.benchmark.referral) of every eye: an ungradable one is served a retake (an
    ophthalmology referral: retake, or refer); the truth is the table applied to its true label and values."""
    if not reports:
        return None
    template = next(iter(reports.values()))  # truth_dispositions replaces label, values and gradability of a report
    matched = {r["case"]: first_match(reports[r["case"]]) for r in rows if not r["ungradable"]}
    served = [OPHTHALMOLOGY if r["ungradable"] else tier(for_eye(reports[r["case"]])) for r in rows]
    truth = truth_dispositions([reports.get(r["case"], template) for r in rows], [r["truth"] for r in rows], measured)
    for row, s, t in zip(rows, served, truth):
        row.update(served_tier=s, truth_tier=tier(t))
        if row["case"] in matched:  # which row of the table, and whether only an estimate's error made it hold
            rule, how = matched[row["case"]]
            row.update(served_rule=rule.rule, within_error=how == WITHIN_ERROR)
    return tier_figures(served, [tier(t) for t in truth])


def narrative_outcome(report) -> str:
    """passed (the first generation), retried (a second attempt passed) or withheld (every attempt failed)."""
    if report.narrative_withheld:
        return "withheld"
    return "retried" if report.first_attempt is not None else "passed"


def summarise(rows: list[dict]) -> dict:
    n = len(rows)
    stated = [r for r in rows if r["stated"] not in (Label.INDETERMINATE.value, "ungradable")]
    wrong = sum(r["stated"] != r["truth"] for r in stated)
    return {
        "n_eyes": n,
        "macro_f1": round(macro_f1([r["truth"] for r in rows], [r["stated"] for r in rows]), 4),
        "stated_wrong_share": round(wrong / n, 4),
        "error_among_stated": round(wrong / len(stated), 4) if stated else None,
        "coverage": round(len(stated) / n, 4),
        "indeterminate_share": round(sum(r["stated"] == Label.INDETERMINATE.value for r in rows) / n, 4),
        "ungradable_share": round(sum(r["ungradable"] for r in rows) / n, 4),
        "ood_share": round(sum(r["ood"] for r in rows) / n, 4),
        "narratives": {k: sum(r.get("narrative") == k for r in rows) for k in ("passed", "retried", "withheld")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shift", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="default: the newest demo-sized bundle in .cache/pipeline")
    parser.add_argument("--manifest", type=Path, help="the bundle's cohort (to fit an OOD model it lacks)")
    parser.add_argument("--subjects", type=int, default=7, help="fresh subjects per device (two eyes each)")
    parser.add_argument("--seed", type=int, default=61733, help="phantom seed of the fresh eyes")
    parser.add_argument(
        "--devices", default=",".join(DEVICES), help=f"comma-separated devices (default all: {', '.join(DEVICES)})"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/shift.json"))
    parser.add_argument("--ledger", type=Path, default=LEDGER, help="reported test cohorts (training.benchmark.ledger)")
    args = parser.parse_args(argv)
    bundle = args.bundle or find_demo_bundle()
    if bundle is None:
        parser.error("no demo-sized bundle in .cache/pipeline: run `make demo` first, or pass --bundle")
    cohort = f"phantom seed {args.seed} ({args.subjects} subjects per device, fresh eyes)"
    if ledger.is_reported(args.ledger, cohort):
        print(f"{cohort} was reported before ({args.ledger}): this run is a RE-RUN, not a held-out figure")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shift-") as work:
        served, fitted = with_fitted(Path(bundle), args.manifest, Path(work))
        engine = Engine.from_bundle(served)
        names = [get_device(name).name for name in args.devices.split(",")]
        devices = {name: run_device(engine, name, args.subjects, args.seed) for name in names}
    seen = training_devices(Path(bundle))
    for name, figures in devices.items():
        figures["in_training_cohort"] = name in seen
    result = {
        "bundle": str(bundle),
        "bundle_version": engine.bundle.version,
        "fitted_here": fitted,
        "seed": args.seed,
        "subjects_per_device": args.subjects,
        "held_out": [name for name, d in DEVICES.items() if d.held_out],
        "seconds": round(time.monotonic() - started, 1),
        "devices": devices,
    }
    result["rerun"] = ledger.record(
        args.ledger,
        cohort,
        what=f"bench/shift.py --devices {args.devices} -> {args.out}",
        commit=code_commit().get("commit", ""),
        headline={name: {k: f[k] for k in HEADLINE} for name, f in devices.items()},
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, figures in devices.items():
        print(name, json.dumps({k: v for k, v in figures.items() if k not in ("eyes", "device", "referral")}))
        if figures["referral"]:
            print("  referral:", json.dumps({k: v for k, v in figures["referral"].items() if k != "tiers"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
