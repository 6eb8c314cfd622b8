"""What the language model adds: the guideline teacher writing from the same decision and estimates.

The deciding component (the decision classifier, or the LM in the paper's configuration) picks each eye's
label; the LM then writes the findings from the estimates the SR carries. Whether the LM adds anything over
a template is a measurement, not an assumption: for every benchmarked eye the deterministic guideline
teacher (training.stage1.teachers.guideline, the writer whose reports the LM was fine-tuned to imitate)
writes the report from the same label and the same served estimates, and both texts are scored the same way:

- against the reference (stage-1) report: corpus BLEU-4, mean ROUGE-L, the judge-free rubric total;
- grounding of the writer's own words (numbers tied to a biomarker equal to the SR's estimate), before any
  runtime rewrite, and after it as served;
- the runtime's narrative validator (grok_pacs.analysis.validation): share passed, repeated sentences,
  distinct-2, and the failure reasons.

Eyes the runtime did not write for (ungradable, no generation) or without a decided label are left out of
both and counted. The
teacher is a template: high grounding and a clean validator are its floor by construction; what the LM
must show against it is on the reference-text metrics (its wording of the same findings) and in how often
its own words still pass.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import fmean

from grok_pacs.analysis.validation import validate_narrative
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label
from grok_pacs.model.prompt import format_target
from training.benchmark.evaluate import evaluate
from training.benchmark.grounding import check_generation_grounding, pooled
from training.records import Prediction, Reference
from training.stage3.targets import TeacherEye

TEACHER = "guideline teacher (template), same label and estimates"
LM = "language model"


@dataclass(frozen=True)
class Written:
    """One writer's text for one eye: as served (`text`), and the writer's own words (`own`, before any rewrite)."""

    case_id: str
    label: Label  #: the label the text was written for (the deciding component's)
    text: str
    own: str
    estimates: Mapping[str, float] = field(default_factory=dict)


def by_teacher(case_id: str, label: Label, estimates: Mapping[str, float], *, concise: bool = True) -> Written:
    """The guideline teacher's report of an eye (`case_id` is "<subject>_<eye>") for `label` from `estimates`."""
    from training.stage1.teachers.guideline import GuidelineTeacher

    subject, _, eye = case_id.rpartition("_")
    paragraph = GuidelineTeacher().write(TeacherEye(subject, eye, Label(label), dict(estimates)), concise=concise)
    text = format_target(paragraph, Label(label))  # the form the LM was trained to write: paragraph, diagnosis line
    return Written(case_id, Label(label), text, text, dict(estimates))


def by_model(case_id: str, report) -> Written | None:
    """The LM's findings of one runtime `Report` (None when it wrote nothing: an ungradable eye)."""
    if not report.raw_text or report.narrative_check is None:
        return None
    served = Prediction.from_report(case_id, report)  # as the benchmark scores it: without the label rule's words
    return Written(case_id, served.label, served.text, report.raw_text, dict(served.biomarkers))


def figures(written: Sequence[Written], references: Sequence[Reference]) -> dict:
    """The module docstring's figures for one writer's texts, each paired with its eye's reference."""
    if not written:
        raise ValueError("no texts to score")
    refs = {r.case_id: r for r in references}
    preds = [Prediction(w.case_id, w.label, w.text, w.estimates) for w in written]
    bench = evaluate(preds, [refs[w.case_id] for w in written], progress=False)
    checks = [validate_narrative(w.own, w.estimates) for w in written]
    own = pooled(check_generation_grounding(w.own, w.estimates) for w in written)
    return {
        "n": len(written),
        "bleu4_corpus": bench.bleu4_corpus,
        "rouge_l_mean": bench.rouge_l_mean,
        "rubric_total": bench.rubric_means["total"],
        "own_grounding": own["agreement_pooled"],
        "served_grounding": bench.grounding["agreement_pooled"],
        "validator_passed_share": sum(c.passed for c in checks) / len(checks),
        "repeated_sentences_per_report": fmean(c.repeated_sentences for c in checks),
        "distinct_2": fmean(c.distinct_2 for c in checks),
        "words_mean": fmean(c.words for c in checks),
        "failure_reasons": dict(Counter(str(r.value) for c in checks for r in c.reasons).most_common()),
    }


def lm_vs_teacher(
    case_ids: Sequence[str], reports: Sequence, references: Sequence[Reference], *, concise: bool = True
) -> dict:
    """Side by side: the LM's findings and the teacher's, on the eyes the LM wrote for."""
    model = [by_model(cid, r) for cid, r in zip(case_ids, reports)]
    # An eye the decider left without a label (Indeterminate) has nothing for the teacher to write from.
    written = [w for w in model if w is not None and w.label in DIAGNOSTIC_LABELS]
    teacher = [by_teacher(w.case_id, w.label, w.estimates, concise=concise) for w in written]
    if not written:
        return {"n": 0, "left_out": len(model), "note": "no eye with a decided label and findings"}
    return {
        "n": len(written),
        "left_out": len(model) - len(written),
        "writers": {LM: figures(written, references), TEACHER: figures(teacher, references)},
    }


ROWS = (
    ("bleu4_corpus", "BLEU-4 against the reference report (corpus)"),
    ("rouge_l_mean", "ROUGE-L against the reference report (mean)"),
    ("rubric_total", "judge-free rubric total (of 50)"),
    ("own_grounding", "grounding of its own words"),
    ("served_grounding", "grounding as served"),
    ("validator_passed_share", "passing the narrative validator"),
    ("repeated_sentences_per_report", "repeated sentences per report"),
    ("distinct_2", "distinct-2"),
    ("words_mean", "words per report (mean)"),
)


def writers_markdown(side_by_side: dict) -> str:
    """The side-by-side table of `lm_vs_teacher`."""
    if not side_by_side.get("n"):
        return side_by_side.get("note", "no eye to compare")
    writers = side_by_side["writers"]
    lines = ["| | " + " | ".join(writers) + " |", "|---|" + "---|" * len(writers)]
    for key, name in ROWS:
        lines.append(f"| {name} | " + " | ".join(_cell(w[key]) for w in writers.values()) + " |")
    left = side_by_side["left_out"]
    return "\n".join(lines) + f"\n\n{side_by_side['n']} eyes; {left} left out (no findings or no decided label)."


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"  # grounding of a text citing no number
