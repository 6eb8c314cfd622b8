"""The demo cohort's test eyes through the demo's bundle: label, text health and AMD subtype consistency.

Usage: .venv/bin/python -m bench.demo_cohort .demo/pipeline.json bench/results/demo_cohort.json
(`.demo/pipeline.json` is what `make demo` wrote: its cohort, stage-1 instructions and bundle). Prints the
summary and every AMD eye, every withheld narrative and every narrative that names a subtype.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grok_pacs.domain.subtypes import amd_subtype, stated_subtypes
from training.benchmark.evaluate import evaluate
from training.benchmark.grounding import check_model_grounding, pooled
from training.stage3.evaluate import load_engine, predict, references


def main(pipeline_json: Path, out: Path) -> None:
    run = json.loads(pipeline_json.read_text())
    refs = references(Path(run["instructions"]), "test")
    engine = load_engine(Path(run["bundle"]))
    preds, reports, per_eye = predict(engine, Path(run["manifest"]), [r.case_id for r in refs], progress=False)
    bench = evaluate(preds, refs, progress=False)
    rows = []
    for ref, rep in zip(refs, reports):
        estimates = {b.key: b.value for b in rep.biomarkers}
        rows.append(
            {
                "case": ref.case_id,
                "truth": ref.label.value,
                "stated": rep.label.value,
                "passed": rep.narrative_check.passed,
                "reasons": [r.value for r in rep.narrative_check.reasons],
                "shown": amd_subtype(estimates),
                "said": stated_subtypes(rep.raw_text),
            }
        )
    result = {
        "bundle": run["bundle"],
        "n": len(refs),
        "macro_f1": bench.classification.macro_f1,
        "accuracy": bench.classification.accuracy,
        "passed": sum(r["passed"] for r in rows),
        "own_grounding": pooled(check_model_grounding(r) for r in reports)["agreement_pooled"],
        "seconds_per_eye": per_eye,
        "eyes": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "eyes"}, indent=1))
    for row in rows:
        if row["truth"] == "AMD" or not row["passed"] or row["said"]:
            print(row)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
