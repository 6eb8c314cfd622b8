"""One bundle through the runtime engine on a manifest's held-out eyes, reduced to what the comparison needs.

References: each eye's label and measurements from the manifest, and its reference report from the stage-1
instruction records when given (`--instructions`), else written by the stage-1 guideline teacher from the
same label and measurements (what the phantom pipeline's stage 1 writes), so that a bare manifest suffices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.benchmark.classification import COLUMNS, ROWS
from training.benchmark.evaluate import BenchmarkResult, evaluate
from training.benchmark.safety import REFER_ACTIONS, truth_dispositions
from training.compare.bootstrap import Outcomes
from training.manifest import CohortRecord, load_manifest
from training.records import Reference
from training.stage3.evaluate import load_engine, predict, references
from training.stage3.features import eye_id


@dataclass(frozen=True)
class BundleRun:
    path: Path
    name: str
    version: str  #: the bundle manifest's version: what the SR names as the algorithm version
    calibrated: bool  #: the bundle carries a label-probability calibration
    seconds_per_eye: float
    bench: BenchmarkResult
    outcomes: Outcomes
    ungradable_with_diagnosis: int  #: must be 0 (the quality gate withholds a diagnosis)


def held_out(manifest: Path, split: str, instructions: Path | None = None) -> tuple[list[Reference], dict]:
    """The references of the manifest's `split` eyes, and the manifest records by case id."""
    records = {eye_id(r.subject_id, r.eye): r for r in load_manifest(manifest) if r.split == split}
    if not records:
        raise ValueError(f"{manifest}: no eyes in the {split!r} split")
    if instructions is not None:
        refs = references(instructions, split)
        unknown = sorted({r.case_id for r in refs} - set(records))
        if unknown:
            raise ValueError(f"{instructions}: eyes {unknown[:5]} are not in the manifest's {split!r} split")
        return refs, {r.case_id: records[r.case_id] for r in refs}
    from training.stage1.teachers.guideline import GuidelineTeacher

    teacher = GuidelineTeacher()
    refs = [Reference(case, r.label, teacher.write(r), r.biomarkers) for case, r in records.items()]
    return refs, records


def _top(scores: dict[str, float], truth: str) -> tuple[float, bool]:
    if not scores:
        return float("nan"), False
    best = max(scores, key=scores.get)
    return float(scores[best]), best == truth


def outcomes(bench: BenchmarkResult, reports: list, records: list[CohortRecord]) -> Outcomes:
    """Per-eye arrays of one bundle's served reports (in the benchmark's case order)."""
    from grok_pacs.report.dispositions import for_eye

    cases = bench.cases
    truth_labels = [c.reference_label.value for c in cases]
    top = [_top(r.label_scores or {}, t) for r, t in zip(reports, truth_labels)]
    checks = [r.narrative_check for r in reports]
    truth_refer = truth_dispositions(reports, truth_labels, [r.biomarkers for r in records])
    return Outcomes(
        truth=np.array([ROWS.index(c.reference_label) for c in cases], int),
        predicted=np.array([COLUMNS.index(c.predicted_label) for c in cases], int),
        confidence=np.array([t[0] for t in top], float),
        top_correct=np.array([t[1] for t in top], bool),
        refer_predicted=np.array([(r.disposition or for_eye(r)).action in REFER_ACTIONS for r in reports], bool),
        refer_truth=np.array([d.action in REFER_ACTIONS for d in truth_refer], bool),
        validated=np.array([c is not None for c in checks], bool),
        passed=np.array([c is not None and c.passed for c in checks], bool),
        repeats=np.array([c.repeated_sentences if c is not None else 0 for c in checks], float),
        n_cited=np.array([c.grounding.n_cited for c in cases], int),
        n_agree=np.array([c.grounding.n_agree for c in cases], int),
        bleu4=np.array([c.bleu4 for c in cases], float),
        rouge_l=np.array([c.rouge_l for c in cases], float),
        rubric_total=np.array([c.rubric.total for c in cases], float),
    )


def run_bundle(
    bundle: Path,
    manifest: Path,
    refs: list[Reference],
    records: dict,
    progress: bool = True,
    threads: int = 0,
    batch_eyes: int = 0,
) -> BundleRun:
    """Load the bundle like the worker does (verified), serve every reference eye, score the reports.
    `batch_eyes` > 2: several subjects a generation (`training.stage3.evaluate.predict`): faster, same labels,
    but the seconds per eye are then not the runtime's."""
    from grok_pacs.analysis.result import Gradability

    engine = load_engine(bundle, threads=threads)
    case_ids = [r.case_id for r in refs]
    # One untimed eye first: the first call pays one-time costs (lazy imports, ONNX sessions' first run) that
    # would otherwise count against whichever bundle runs first.
    predict(engine, manifest, case_ids[:1], progress=False)
    predictions, reports, per_eye = predict(engine, manifest, case_ids, progress, batch_eyes=batch_eyes)
    bench = evaluate(predictions, refs, progress=False)
    by_case = dict(zip(case_ids, reports))
    ordered = [by_case[c.case_id] for c in bench.cases]  # evaluate pairs in reference order; made sure here
    return BundleRun(
        path=Path(bundle),
        name=engine.bundle.name,
        version=engine.bundle.version,
        calibrated=engine.calibration is not None,
        seconds_per_eye=per_eye,
        bench=bench,
        outcomes=outcomes(bench, ordered, [records[c.case_id] for c in bench.cases]),
        ungradable_with_diagnosis=sum(r.gradability is not Gradability.GRADABLE and r.diagnosed for r in ordered),
    )
