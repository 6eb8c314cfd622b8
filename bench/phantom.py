"""`make benchmark`: the Grounded Ophthalmic Understanding benchmark (docs/domain.md, Evaluation) on a fixed-seed
phantom cohort.

Runs the phantom pipeline (training.pipeline: cohort, stage 1, stage 2, stage 3 of the pretrained SmolLM2
stand-in with the `smollm` preset, temperature calibration on validation subjects; on the CPU; cached, so a
re-run only evaluates) twice, with and without the biomarker heads' estimates in the prompt, evaluates both
bundles through the runtime engine on the held-out test subjects (both eyes of a subject in one batched
generation), and writes
- bench/results/phantom.json: macro_f1, per-label F1, mae_aligned, mae_plain, grounding_agreement (headline
  variant: with estimates), both variants' summaries, the targets and whether they are met, timings;
- bench/results/phantom.md: the report with the comparison table and the plots (bench/results/phantom/).
Usage: python -m bench.phantom [--subjects N] [--seed S] [--cache DIR] [--only-estimates] [--devices A,B]

`--devices` shares the cohort's subjects among several training devices (training.phantom.devices): the
bundle then trains on all of them and the headline gains one row of figures per device (`per_device`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import replace
from pathlib import Path

from bench.phantom_report import markdown
from bench.shift import summarise
from grok_pacs.analysis.parsing import parse_generation
from training.benchmark import ledger
from training.benchmark.evaluate import evaluate
from training.benchmark.grounding import check_model_grounding, pooled
from training.benchmark.honesty import safety_and_honesty
from training.benchmark.ledger import cohort_key
from training.benchmark.referral import referral_tiers
from training.benchmark.report import write_comparison, write_report
from training.benchmark.selective import decided, selective_figures
from training.benchmark.teacher import lm_vs_teacher
from training.cohort.fingerprint import code_commit
from training.manifest import load_manifest
from training.phantom.devices import REFERENCE, get_device
from training.pipeline import DECIDERS, DEFAULT_CACHE, PipelineConfig, PipelineResult, quiet_exporter_logs, run_pipeline
from training.stage3.config import Stage3Config
from training.stage3.evaluate import load_engine, predict, references
from training.stage3.features import eye_id

RESULTS = Path(__file__).resolve().parent / "results"
SUBJECTS, SEED = 420, 2024
#: Stage 3 of the benchmark: the `smollm` preset as `make demo` trains it, unchanged. Its settings were chosen
#: on the 70-subject demo cohort of seed 7 (docs/training.md), never on this cohort: its test split is untouched.
STAGE3_CHANGES: dict = {}
#: Issue 14's targets (the served grounding keeps the older 0.95 target, docs/domain.md, Evaluation).
TARGETS = {
    "macro_f1": 0.85,
    "grounding_agreement": 0.95,
    "model_grounding_agreement": 0.90,
    "text_passed_share": 1.0,
    "repeated_sentences_per_report": 0.0,
}
VARIANTS = {"with estimates": True, "without estimates": False}


def _stage2_mae(result: PipelineResult) -> dict:
    report = json.loads(Path(result.stage2["OCT"]["report"]).read_text())
    cfp = json.loads(Path(result.stage2["CFP"]["report"]).read_text())
    overall = {name: enc["overall"] for name, enc in report["encoders"].items()}
    return {
        "mae_aligned": overall["aligned"]["mae"],
        "mae_plain": overall["plain"]["mae"],
        "oct": overall,
        "cfp": {name: enc["overall"] for name, enc in cfp["encoders"].items()},
        "n_test_eyes": report["n_test_eyes"],
    }


def _run_variant(
    cfg: PipelineConfig, cache: Path, progress: bool, plots_dir: Path | None = None, batch_eyes: int = 0
) -> tuple[PipelineResult, object, dict]:
    started = time.monotonic()
    result = run_pipeline(cfg, cache, progress=progress)
    trained = time.monotonic() - started
    refs = references(result.instructions, "test")
    engine = load_engine(result.bundle)
    preds, reports, per_eye = predict(engine, result.manifest, [r.case_id for r in refs], progress, batch_eyes)
    bench = evaluate(preds, refs, progress=progress)
    model = pooled(check_model_grounding(report) for report in reports)
    honesty = safety_and_honesty(engine, result.manifest, [r.case_id for r in refs], reports)
    truth = [r.label.value for r in refs]
    variant = f"{cfg.decider}-{'with' if cfg.stage3.biomarker_estimates else 'without'}-estimates"
    plot = plots_dir / f"risk-coverage-{variant}.png" if plots_dir else None
    honesty["selective"] = selective_figures(reports, truth, plot)
    honesty["referral_tiers"] = referral_tiers(reports, truth, [dict(r.biomarkers) for r in refs])
    honesty["lm_vs_teacher"] = lm_vs_teacher(
        [r.case_id for r in refs], reports, refs, concise=cfg.stage3.concise_reports
    )
    stage3 = json.loads((result.stage3_dir / "stage3.json").read_text())
    devices = {eye_id(r.subject_id, r.eye): r.meta.get("device", REFERENCE) for r in load_manifest(result.manifest)}
    info = {
        "pipeline_s": round(trained, 1),
        "pipeline_steps_s": result.timings_s,
        "reused": result.reused,
        "seconds_per_eye": round(per_eye, 2),
        "batch_eyes": batch_eyes,  # 0: a subject's eyes a generation, as the runtime; else not the runtime's time
        "bundle": str(result.bundle),
        "stage3_val_loss": [stage3["first_val_loss"], stage3["last_val_loss"]],
        "stage3_timings_s": stage3["timings_s"],
        "curve": stage3["curve_png"],
        "model_grounding_agreement": model["agreement_pooled"],
        "model_grounding": model,
        "numbers_rewritten_per_report": sum(r.numbers_rewritten for r in reports) / len(reports),
        "diagnosis_line_share": sum(parse_generation(r.raw_text).label_found for r in reports) / len(reports),
        # Served: the share of eyes whose report states a diagnosis (a calibrated probability at or above the
        # operating point); macro-F1 scores the label the findings concluded either way.
        "stated_diagnosis_share": sum(r.label.value != "Indeterminate" for r in reports) / len(reports),
        "honesty": honesty,
        # Per eye, so calibration and referral operating points can be studied without re-running the model.
        "per_eye": [
            {
                "case": ref.case_id,
                "truth": ref.label.value,
                "concluded": pred.label.value,
                "stated": report.label.value,
                # What decided: the deciding component, its label and probability, and the LM's conclusion
                "decided_by": report.decided_by,
                "decided_label": decided(report)[0],
                "decided_probability": decided(report)[1],
                "lm_conclusion": report.lm_label.value if report.lm_label else None,
                "lm_scores": report.lm_scores,
                "label_scores": {k: round(v, 5) for k, v in (report.label_scores or {}).items()},
                # The engine's scores before calibration, unrounded: a calibration study needs their tails.
                "raw_label_scores": report.uncalibrated_scores,
                "disposition": report.disposition.action.value if report.disposition else None,
                "narrative_passed": report.narrative_check.passed if report.narrative_check else None,
                "device": devices[ref.case_id],
                "out_of_distribution": report.out_of_distribution,
            }
            for ref, pred, report in zip(refs, preds, reports)
        ],
    }
    info["per_device"] = per_device(info["per_eye"])
    return result, bench, info


def per_device(per_eye: list[dict]) -> dict[str, dict]:
    """bench.shift's figures for the test eyes of each acquisition device (no gate here: none is ungradable)."""
    rows: dict[str, list[dict]] = {}
    for eye in per_eye:
        row = {"truth": eye["truth"], "stated": eye["stated"], "ungradable": False, "ood": eye["out_of_distribution"]}
        rows.setdefault(eye["device"], []).append(row)
    return {device: summarise(found) for device, found in sorted(rows.items())}


def _headline(bench, mae: dict, info: dict) -> dict:
    return {
        "macro_f1": bench.classification.macro_f1,
        "per_label_f1": _per_label(bench),
        "mae_aligned": mae["mae_aligned"],
        "mae_plain": mae["mae_plain"],
        "grounding_agreement": bench.grounding["agreement_pooled"],
        "model_grounding_agreement": info["model_grounding_agreement"],
        "numbers_rewritten_per_report": info["numbers_rewritten_per_report"],
        "accuracy": bench.classification.accuracy,
        "n_test_eyes": bench.n,
        "text_passed_share": info["honesty"]["text_health"]["passed_share"],
        "text_first_attempt_passed_share": info["honesty"]["text_health"].get("first_attempt_passed_share"),
        "repeated_sentences_per_report": info["honesty"]["text_health"]["repeated_sentences_per_report"],
        "distinct_2": info["honesty"]["text_health"]["distinct_2"],
        "probe_ceiling_measured_macro_f1": info["honesty"]["probe_ceiling_measured"]["macro_f1"],
        "probe_ceiling_estimates_macro_f1": info["honesty"]["probe_ceiling_estimates"]["macro_f1"],
        "ece_before": info["honesty"]["calibration"]["ece_before"],
        "ece_after": info["honesty"]["calibration"]["ece_after"],
        "referral_sensitivity": info["honesty"]["referral"]["sensitivity"],
        "referral_specificity": info["honesty"]["referral"]["specificity"],
        "ungradable_with_diagnosis": info["honesty"]["referral"]["ungradable_with_diagnosis"],
        **_decision_headline(info["honesty"]),
        "per_device": info["per_device"],
    }


def _decision_headline(honesty: dict) -> dict:
    """Selective prediction and the referral tiers (training.benchmark.selective, .referral)."""
    sel, tiers = honesty["selective"], honesty["referral_tiers"]
    return {
        "decided_by": sel.get("decided_by"),
        "operating_point": sel.get("operating_point"),
        "coverage": sel.get("coverage"),
        "error_stated": sel.get("error_stated"),
        "auroc_right_vs_wrong": sel.get("auroc_right_vs_wrong"),
        "ece_decider": sel.get("ece"),
        "ece_decider_ci95": sel.get("ece_ci95"),
        "distinct_confidences": sel.get("distinct_confidences"),
        "ophthalmologist_sensitivity": tiers["needs_ophthalmologist"]["sensitivity"],
        "ophthalmologist_specificity": tiers["needs_ophthalmologist"]["specificity"],
        "urgent_sensitivity": tiers["urgent"]["sensitivity"],
        "urgent_specificity": tiers["urgent"]["specificity"],
    }


def _per_label(bench) -> dict[str, float]:
    return {scores.label: scores.f1 for scores in bench.classification.per_label}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Phantom benchmark: train (cached) and evaluate on held-out subjects.")
    parser.add_argument("--subjects", type=int, default=SUBJECTS, help=f"phantom subjects (default {SUBJECTS})")
    parser.add_argument("--seed", type=int, default=SEED, help=f"cohort seed (default {SEED})")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"pipeline cache (default {DEFAULT_CACHE})")
    parser.add_argument("--only-estimates", action="store_true", help="skip the variant without estimates")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--decider", choices=DECIDERS, default="classifier", help="who decides (training.pipeline)")
    parser.add_argument("--ledger", type=Path, default=RESULTS / "ledger.json", help="reported test cohorts")
    parser.add_argument(
        "--calibration-subjects", type=int, default=0, help="validation subjects the LM calibration uses (0 = all)"
    )
    parser.add_argument(
        "--devices",
        default=REFERENCE,
        help=f"comma-separated training devices the subjects are shared among (default {REFERENCE})",
    )
    parser.add_argument(
        "--batch-eyes", type=int, default=0, help="eyes a generation at evaluation (0: a subject's, as the runtime)"
    )
    args = parser.parse_args(argv)
    cohort = cohort_key(args.seed, args.subjects)
    if ledger.is_reported(args.ledger, cohort):
        logging.warning("%s was reported before (%s): this run is a RE-RUN, not a held-out figure", cohort, args.ledger)
    results_dir, plots_dir = args.out, args.out / "phantom"
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_exporter_logs()
    progress = not args.quiet
    # Calibration on every validation eye (the demo's default fits on its first 16 subjects, for time).
    base = PipelineConfig.small(
        n_subjects=args.subjects,
        seed=args.seed,
        dicom=False,
        calibration_subjects=args.calibration_subjects,
        decider=args.decider,
        devices=tuple(get_device(name).name for name in args.devices.split(",")),
    )
    variants = {name: flag for name, flag in VARIANTS.items() if flag or not args.only_estimates}
    results, benches, infos = {}, {}, {}
    for name, flag in variants.items():
        cfg = replace(base, stage3=Stage3Config.smollm(biomarker_estimates=flag, **STAGE3_CHANGES))
        results[name], benches[name], infos[name] = _run_variant(cfg, args.cache, progress, plots_dir, args.batch_eyes)
    first = next(iter(variants))
    mae = _stage2_mae(results[first])
    headline = _headline(benches[first], mae, infos[first])
    plots_dir.mkdir(parents=True, exist_ok=True)
    if len(benches) == 2:
        a, b = benches.values()
        paths = write_comparison(a, b, plots_dir, "phantom benchmark", names=tuple(variants))
        comparison_md = "\n".join(paths["markdown"].read_text().splitlines()[2:])
        comparison_md = comparison_md.replace(
            "](phantom-benchmark", "](phantom/phantom-benchmark"
        )  # links from results/
    else:
        paths = write_report(benches[first], plots_dir, f"phantom benchmark {first}")
        comparison_md = "(only the variant with estimates was run)"
    plots = {p.stem: f"phantom/{p.name}" for p in sorted(plots_dir.glob("*-confusion.png"))}
    plots.update({p.stem: f"phantom/{p.name}" for p in sorted(plots_dir.glob("risk-coverage-*.png"))})
    for name, info in infos.items():
        target = plots_dir / f"loss-curve-{name.replace(' ', '-')}.png"
        shutil.copyfile(info["curve"], target)
        plots[f"stage-3 loss, {name}"] = f"phantom/{target.name}"
    for modality, report in results[first].stage2.items():
        curve = Path(report["report"]).parent / "curve.png"
        if curve.is_file():
            shutil.copyfile(curve, plots_dir / f"stage2-{modality.lower()}-curve.png")
            plots[f"stage-2 {modality} curve"] = f"phantom/stage2-{modality.lower()}-curve.png"
    met = {
        "macro_f1": headline["macro_f1"] >= TARGETS["macro_f1"],
        "mae": mae["mae_aligned"] < mae["mae_plain"],
        "grounding_agreement": (headline["grounding_agreement"] or 0.0) >= TARGETS["grounding_agreement"],
        "model_grounding_agreement": (headline["model_grounding_agreement"] or 0.0)
        >= TARGETS["model_grounding_agreement"],
        "text_passed_share": headline["text_passed_share"] >= TARGETS["text_passed_share"],
        "repeated_sentences_per_report": headline["repeated_sentences_per_report"]
        <= TARGETS["repeated_sentences_per_report"],
    }
    payload = {
        "headline_variant": first,
        "headline": headline,
        **{
            k: headline[k]
            for k in (
                "macro_f1",
                "per_label_f1",
                "mae_aligned",
                "mae_plain",
                "grounding_agreement",
                "model_grounding_agreement",
            )
        },
        "targets": TARGETS,
        "targets_met": met,
        "stage2": mae,
        "variants": {
            name: {**infos[name], "summary": benches[name].summary(), "per_label_f1": _per_label(benches[name])}
            for name in variants
        },
        "cohort": {"n_subjects": args.subjects, "seed": args.seed, "devices": list(base.devices)},
        "stage3_changes": STAGE3_CHANGES,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    payload["ledger_cohort"] = cohort
    payload["rerun"] = ledger.record(
        args.ledger,
        cohort,
        what=f"bench/phantom.py -> {results_dir}",
        commit=code_commit().get("commit", ""),
        headline={k: headline[k] for k in ("macro_f1", "coverage", "error_stated", "auroc_right_vs_wrong")},
    )
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "phantom.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (results_dir / "phantom.md").write_text(markdown(payload, comparison_md, plots, TARGETS))
    print(
        json.dumps(
            {
                k: payload[k]
                for k in ("macro_f1", "mae_aligned", "mae_plain", "grounding_agreement", "targets_met", "rerun")
            },
            indent=2,
            default=str,
        )
    )
    print(f"report: {results_dir / 'phantom.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
