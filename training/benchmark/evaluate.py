"""Run every benchmark metric over paired predictions and references: `evaluate(...) -> BenchmarkResult`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from statistics import fmean

from tqdm import tqdm

from grok_pacs.domain.labels import Label
from training.benchmark.classification import ClassificationResult, classify
from training.benchmark.grounding import GroundingResult, check_grounding, pooled
from training.benchmark.judge import CRITERIA, Judge, JudgeError, JudgeVerdict
from training.benchmark.rubric import RubricScores, score_report
from training.benchmark.text import corpus_bleu, rouge_l, sentence_bleu
from training.records import Prediction, Reference, pair_up


@dataclass(frozen=True)
class CaseResult:
    case_id: str
    reference_label: Label
    predicted_label: Label
    bleu4: float  #: sentence BLEU-4, epsilon smoothing
    rouge_l: float
    rubric: RubricScores
    grounding: GroundingResult
    judge: JudgeVerdict | None = None
    judge_error: str | None = None  #: why the judge gave no verdict for this case

    def to_dict(self) -> dict:
        return {
            "case_id": self.case_id,
            "reference_label": self.reference_label.value,
            "predicted_label": self.predicted_label.value,
            "bleu4": self.bleu4,
            "rouge_l": self.rouge_l,
            "rubric": {**asdict(self.rubric), "total": self.rubric.total},
            "grounding": self.grounding.to_dict(),
            "judge": None if self.judge is None else {**asdict(self.judge), "total": self.judge.total},
            "judge_error": self.judge_error,
        }


@dataclass(frozen=True)
class BenchmarkResult:
    classification: ClassificationResult
    bleu4_corpus: float
    bleu4_sentence_mean: float
    rouge_l_mean: float
    rubric_means: dict[str, float]  #: diagnosis, quantitative, coverage, total (judge-free, max 50)
    grounding: dict  #: `grounding.pooled` totals
    judge_means: dict[str, float] | None  #: criterion -> mean over judged cases, plus "total"
    judge_classification: ClassificationResult | None  #: from the judge's reading of the label
    judge_failures: int
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.cases)

    def summary(self) -> dict[str, float | None]:
        """Headline numbers, flat, in a fixed order (what `compare` tabulates)."""
        rows: dict[str, float | None] = {
            "macro_f1": self.classification.macro_f1,
            "accuracy": self.classification.accuracy,
            "indeterminate": float(self.classification.indeterminate),
            "bleu4_corpus": self.bleu4_corpus,
            "bleu4_sentence_mean": self.bleu4_sentence_mean,
            "rouge_l_mean": self.rouge_l_mean,
            **{f"rubric_{name}": value for name, value in self.rubric_means.items()},
            "grounding_agreement_pooled": self.grounding["agreement_pooled"],
            "grounding_agreement_mean": self.grounding["agreement_mean_per_report"],
            "cited_numbers_per_report": self.grounding["n_cited"] / self.n if self.n else None,
        }
        if self.judge_means is not None:
            rows.update({f"judge_{name}": value for name, value in self.judge_means.items()})
            rows["judge_macro_f1"] = self.judge_classification.macro_f1 if self.judge_classification else None
        return rows

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "summary": self.summary(),
            "classification": self.classification.to_dict(),
            "grounding": self.grounding,
            "judge_failures": self.judge_failures,
            "judge_classification": self.judge_classification.to_dict() if self.judge_classification else None,
            "cases": [case.to_dict() for case in self.cases],
        }


def _score_case(prediction: Prediction, reference: Reference, judge: Judge | None) -> CaseResult:
    verdict, error = None, None
    if judge is not None:
        try:
            verdict = judge.judge(reference.text, reference.biomarkers, prediction.text)
        except JudgeError as failure:
            error = str(failure)  # recorded per case and counted in the result, not hidden
    return CaseResult(
        case_id=reference.case_id,
        reference_label=reference.label,
        predicted_label=prediction.label,
        bleu4=sentence_bleu(prediction.text, reference.text),
        rouge_l=rouge_l(prediction.text, reference.text),
        rubric=score_report(prediction.text, prediction.label, reference.label, reference.biomarkers, reference.text),
        grounding=check_grounding(prediction.text, prediction.biomarkers),
        judge=verdict,
        judge_error=error,
    )


def _judge_summary(cases: list[CaseResult]) -> tuple[dict[str, float] | None, ClassificationResult | None]:
    judged = [case for case in cases if case.judge is not None]
    if not judged:
        return None, None
    means = {name: fmean(case.judge.scores[name] for case in judged) for name in CRITERIA}
    means["total"] = fmean(case.judge.total for case in judged)
    return means, classify([c.reference_label for c in judged], [c.judge.label for c in judged])


def evaluate(
    predictions: list[Prediction], references: list[Reference], judge: Judge | None = None, progress: bool = True
) -> BenchmarkResult:
    """All metrics of docs/domain.md, Evaluation, for predictions paired with references by case id (LLM judge
    optional)."""
    pairs = pair_up(predictions, references)
    if not pairs:
        raise ValueError("nothing to evaluate: no predictions and references")
    cases = [_score_case(p, r, judge) for p, r in tqdm(pairs, desc="benchmark", disable=not progress)]
    judge_means, judge_classification = _judge_summary(cases)
    return BenchmarkResult(
        classification=classify([c.reference_label for c in cases], [c.predicted_label for c in cases]),
        bleu4_corpus=corpus_bleu([p.text for p, _ in pairs], [r.text for _, r in pairs]),
        bleu4_sentence_mean=fmean(c.bleu4 for c in cases),
        rouge_l_mean=fmean(c.rouge_l for c in cases),
        rubric_means={
            "diagnosis": fmean(c.rubric.diagnosis for c in cases),
            "quantitative": fmean(c.rubric.quantitative for c in cases),
            "coverage": fmean(c.rubric.coverage for c in cases),
            "total": fmean(c.rubric.total for c in cases),
        },
        grounding=pooled(c.grounding for c in cases),
        judge_means=judge_means,
        judge_classification=judge_classification,
        judge_failures=sum(c.judge_error is not None for c in cases),
        cases=cases,
    )
