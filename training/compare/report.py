"""The comparison as files: `comparison.json` for scripts, `comparison.md` for people, and each bundle's own
benchmark report (`training.benchmark.report.write_report`: every figure, the confusion matrix as PNG)."""

from __future__ import annotations

import json
from pathlib import Path

from training.benchmark.classification import COLUMNS, ROWS
from training.benchmark.report import write_report
from training.compare.scoring import BundleRun

SCHEMA = "grok-pacs-compare/1"


def payload(candidate: BundleRun, serving: BundleRun, table: dict, decision: dict, rule: str, setup: dict) -> dict:
    """Everything the comparison found, JSON-ready."""

    def side(run: BundleRun) -> dict:
        return {
            "path": str(run.path),
            "name": run.name,
            "version": run.version,
            "calibrated": run.calibrated,
            "seconds_per_eye": run.seconds_per_eye,
            "eyes": [case.case_id for case in run.bench.cases],  # the eyes scored, in the paired order
            "ungradable_with_diagnosis": run.ungradable_with_diagnosis,
            "summary": run.bench.summary(),
            "confusion": {
                "rows": [label.value for label in ROWS],
                "columns": [label.value for label in COLUMNS],
                "counts": run.bench.classification.confusion,
            },
        }

    return {
        "schema": SCHEMA,
        **setup,
        "n_eyes": candidate.bench.n,
        "candidate": side(candidate),
        "serving": side(serving),
        "figures": table,
        "rule": rule,
        "verdict": {"decision": "promote" if decision["promote"] else "keep serving", **decision},
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _cell(entry: dict, signed: bool = False) -> str:
    value, interval = entry["value"], entry["interval"]
    text = "n/a" if value is None else (f"{value:+.4f}" if signed else f"{value:.4f}")
    if interval is not None:
        low, high = interval
        text += f" [{low:+.4f}, {high:+.4f}]" if signed else f" [{low:.4f}, {high:.4f}]"
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(data: dict, links: dict[str, str]) -> str:
    cand, serv, verdict = data["candidate"], data["serving"], data["verdict"]
    level = f"{data['level']:.0%}"
    lines = [
        f"# Candidate {cand['name']} {cand['version']} vs serving {serv['name']} {serv['version']}",
        "",
        f"{data['n_eyes']} eyes of the `{data['split']}` split of `{data['manifest']}`; reference reports: "
        f"{data['references']}.",
        "",
        f"**Verdict: {verdict['decision']}.** Rule: {data['rule']}.",
        "",
        *[f"- {'passed' if c['passed'] else 'FAILED'}: {c['detail']}" for c in verdict["checks"]],
        "",
        f"## Figures (value [{level} bootstrap interval]; difference = candidate - serving, paired)",
        "",
    ]
    rows = [
        [metric, _cell(row["serving"]), _cell(row["candidate"]), _cell(row["difference"], signed=True)]
        for metric, row in data["figures"].items()
    ]
    batched = f" ({data['batch_eyes']} eyes a generation: not the runtime's)" if data["batch_eyes"] > 2 else ""
    rows.append([f"seconds_per_eye{batched}", f"{serv['seconds_per_eye']:.2f}", f"{cand['seconds_per_eye']:.2f}", ""])
    rows.append(
        [
            "ungradable_with_diagnosis",
            str(serv["ungradable_with_diagnosis"]),
            str(cand["ungradable_with_diagnosis"]),
            "",
        ]
    )
    lines += _table(["figure", "serving", "candidate", "difference"], rows)
    for role, run in (("serving", serv), ("candidate", cand)):
        lines += ["", f"## Confusion, {role} (rows: reference, columns: predicted)", ""]
        confusion = run["confusion"]
        lines += _table(
            ["reference \\ predicted", *confusion["columns"]],
            [[label, *map(str, row)] for label, row in zip(confusion["rows"], confusion["counts"])],
        )
    lines += ["", "Each bundle's full benchmark report:", ""]
    lines += [f"- {role}: [{path}]({path})" for role, path in links.items()]
    lines += [
        "",
        "Figures: macro-F1/accuracy/F1 per label as `training.benchmark.classification`; ECE of the served "
        "(calibrated where the bundle is) top-label probability, 15 bins; referral sensitivity/specificity of the "
        "served dispositions against those the truth calls for; validator pass rate and repeated sentences over "
        "the narratives the validator saw; grounding agreement pooled over cited numbers. Seconds per eye "
        "include reading the images (one machine, both bundles in turn: compare them only on the same machine).",
    ]
    return "\n".join(lines) + "\n"


def write(out: Path, data: dict, candidate: BundleRun, serving: BundleRun) -> dict[str, Path]:
    """`comparison.json`, `comparison.md` and both bundles' benchmark reports under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    links = {}
    for role, run in (("serving", serving), ("candidate", candidate)):
        paths = write_report(run.bench, out, f"{role} {run.name} {run.version}")
        links[role] = paths["markdown"].name
    paths = {"json": out / "comparison.json", "markdown": out / "comparison.md"}
    paths["json"].write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown(data, links), encoding="utf-8")
    return paths
