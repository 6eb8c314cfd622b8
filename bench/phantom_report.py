"""The phantom benchmark's Markdown report (bench/phantom.py writes it as bench/results/phantom.md): headline
with targets, who decided and selective prediction, referral by tier, the LM beside the guideline teacher, the
with/without-estimates comparison, timings and plots."""

from __future__ import annotations

from training.benchmark.referral import tier_markdown
from training.benchmark.selective import curve_table
from training.benchmark.teacher import writers_markdown


def markdown(payload: dict, comparison_md: str, plots: dict[str, str], targets: dict) -> str:
    h = payload["headline"]
    met = payload["targets_met"]
    lines = [
        "# Phantom benchmark (Grounded Ophthalmic Understanding, docs/domain.md, Evaluation)",
        "",
        f"Fixed-seed phantom cohort: {payload['cohort']['n_subjects']} synthetic subjects (seed "
        f"{payload['cohort']['seed']}), stages 1-3 with the small configurations on the CPU, evaluated through "
        f"the runtime engine on {h['n_test_eyes']} held-out test eyes (subjects never seen in training). "
        "Synthetic data: these numbers say the pipeline learns what the phantom makes visible, nothing clinical. "
        "Stage 3: LoRA SFT of the pretrained SmolLM2-135M-Instruct stand-in with the `smollm` preset "
        f"(changes: {payload['stage3_changes'] or 'none'}), whose settings were chosen on the 70-subject demo "
        "cohort of another seed (docs/training.md), never on this cohort: its test split is untouched. The "
        "label-score temperature is fitted on validation subjects.",
        "",
        "## Headline (with the biomarker estimates in the prompt)",
        "",
        "| metric | value | target | met |",
        "|---|---|---|---|",
        f"| macro-F1 (7 labels; chance 0.14) | {h['macro_f1']:.3f} | >= {targets['macro_f1']} | {met['macro_f1']} |",
        f"| OCT biomarker MAE, aligned encoder (um) | {h['mae_aligned']:.3f} | below plain | {met['mae']} |",
        f"| OCT biomarker MAE, plain encoder (um) | {h['mae_plain']:.3f} | | |",
        f"| grounding agreement | {_fmt(h['grounding_agreement'])} | >= {targets['grounding_agreement']} | "
        f"{met['grounding_agreement']} |",
        f"| grounding of the model's own text (before the runtime writes misquoted numbers as the estimates) | "
        f"{_fmt(h['model_grounding_agreement'])} | >= {targets['model_grounding_agreement']} | "
        f"{met['model_grounding_agreement']} |",
        f"| numbers rewritten per report | {h['numbers_rewritten_per_report']:.2f} | | |",
        f"| accuracy | {h['accuracy']:.3f} | | |",
        f"| linear-probe ceiling: measured biomarkers, train -> test (macro-F1) | "
        f"{h['probe_ceiling_measured_macro_f1']:.3f} | | |",
        f"| linear-probe ceiling: served estimates, val -> test (macro-F1) | "
        f"{h['probe_ceiling_estimates_macro_f1']:.3f} | | |",
        f"| narratives passing the validator (as served, after retries; first attempts "
        f"{_pct(h.get('text_first_attempt_passed_share'))}) | {h['text_passed_share']:.0%} | 100% | "
        f"{met['text_passed_share']} |",
        f"| repeated sentences per report | {h['repeated_sentences_per_report']:.2f} | 0 | "
        f"{met['repeated_sentences_per_report']} |",
        f"| distinct-2 | {h['distinct_2']:.3f} | | |",
        f"| ECE of the LM's label scores before / after calibration (T fitted on val) | {h['ece_before']:.3f} / "
        f"{h['ece_after']:.3f} | <= 0.05 after | |",
        f"| referral sensitivity / specificity | {_fmt(h['referral_sensitivity'])} / "
        f"{_fmt(h['referral_specificity'])} | >= 0.95 / >= 0.80 | |",
        f"| ungradable eyes with a diagnosis | {h['ungradable_with_diagnosis']} | 0 | |",
        "",
        "Per-label F1: " + ", ".join(f"{k} {_fmt(v)}" for k, v in h["per_label_f1"].items()),
        "",
        *_decision_markdown(payload),
        "## With vs without the biomarker estimates in the prompt",
        "",
        comparison_md,
        "",
        "Grounding of the model's own text (before the runtime writes misquoted numbers as the estimates): "
        + "; ".join(
            f"{name} {_fmt(info['model_grounding_agreement'])} ({info['numbers_rewritten_per_report']:.1f} "
            "numbers rewritten per report)"
            for name, info in payload["variants"].items()
        )
        + ". "
        "The table's grounding rows are the served reports, after that rewrite.",
        "",
        "## Timings",
        "",
    ]
    for name, info in payload["variants"].items():
        lines.append(
            f"- {name}: pipeline {info['pipeline_s']} s this run (steps: "
            + ", ".join(
                f"{k} {v} s{' (cached)' if info['reused'].get(k) else ''}" for k, v in info["pipeline_steps_s"].items()
            )
            + f"); stage 3 {info['stage3_timings_s']}; {info['seconds_per_eye']} s per eye at evaluation; "
            f"{info['diagnosis_line_share']:.0%} of the generations end with a valid diagnosis line; "
            f"{info.get('stated_diagnosis_share', 1.0):.0%} of the served reports state a diagnosis (the rest: "
            "calibrated probability below the operating point, or no valid label)."
        )
    lines += ["", "## Plots", ""] + [f"![{name}]({path})" for name, path in plots.items()]
    lines += ["", f"Machine: {payload['machine']['cpus']} CPUs, {payload['machine']['platform']}.", ""]
    return "\n".join(lines)


def _decision_markdown(payload: dict) -> list[str]:
    """Who decided, selective prediction (risk-coverage) and referral by tier, for the headline variant."""
    honesty = payload["variants"][payload["headline_variant"]]["honesty"]
    sel, h = honesty["selective"], payload["headline"]
    rerun = "**RE-RUN**: this cohort's test split was reported before (bench/results/ledger.json). " * bool(
        payload.get("rerun")
    )
    return [
        "## Who decided, and selective prediction",
        "",
        f"{rerun}Label decided by: {', '.join(h['decided_by'] or [])}. Operating point {_fmt(h['operating_point'])} "
        f"({_chosen_on(h['decided_by'])}): "
        f"coverage {_fmt(h['coverage'])}, error among stated labels "
        f"{_fmt(h['error_stated'])}; AUROC of the confidence, right vs wrong {_fmt(h['auroc_right_vs_wrong'])}; "
        f"ECE {_fmt(h['ece_decider'])} (95 % interval {', '.join(_fmt(v) for v in h['ece_decider_ci95'] or [])}); "
        f"{h['distinct_confidences']} distinct confidence values over {sel.get('n_scored')} eyes.",
        "",
        curve_table(sel.get("risk_coverage", [])),
        "",
        "## Referral by tier",
        "",
        tier_markdown(honesty["referral_tiers"]),
        "",
        "## What the language model adds: its findings beside the guideline teacher's (same label, same estimates)",
        "",
        writers_markdown(honesty["lm_vs_teacher"]),
        "",
        *_device_markdown(payload["variants"][payload["headline_variant"]].get("per_device") or {}),
    ]


def _device_markdown(per_device: dict[str, dict]) -> list[str]:
    """One row per acquisition device of the test eyes (bench.shift's figures), when there are several."""
    if len(per_device) < 2:
        return []
    rows = [
        f"| `{name}` | {f['n_eyes']} | {f['macro_f1']:.3f} | {f['stated_wrong_share']:.0%} | "
        f"{'none stated' if f['error_among_stated'] is None else format(f['error_among_stated'], '.1%')} | "
        f"{f['coverage']:.0%} | {f['ood_share']:.0%} |"
        for name, f in per_device.items()
    ]
    return [
        "## Per acquisition device (the test eyes of each; macro-F1 counts an eye with no stated label as a miss)",
        "",
        "| device | eyes | macro-F1 | stated wrong | error among stated | coverage | marked device shift |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _chosen_on(decided_by: list[str] | None) -> str:
    if "decision classifier" in (decided_by or []):
        return "chosen on the calibration eyes: training eyes out of fold and validation"
    return "the bundle's, or the site's, operating point for the language model's calibrated scores"
