"""Grounded Ophthalmic Understanding benchmark metrics (docs/domain.md, Evaluation), as a library.

Entry points: `evaluate(predictions, references, judge=None) -> BenchmarkResult`,
`write_report(result, out_dir, title)`, `compare(result_a, result_b)` and
`write_comparison(result_a, result_b, out_dir, title)`. The pieces (classification, text overlap,
judge-free rubric, LLM judge, grounding) are usable on their own from their modules.
"""

from training.benchmark.evaluate import BenchmarkResult, CaseResult, evaluate
from training.benchmark.report import Comparison, compare, write_comparison, write_report
from training.records import Prediction, Reference

__all__ = [
    "BenchmarkResult",
    "CaseResult",
    "Comparison",
    "Prediction",
    "Reference",
    "compare",
    "evaluate",
    "write_comparison",
    "write_report",
]
