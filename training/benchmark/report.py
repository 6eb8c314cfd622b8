"""Benchmark results as files: Markdown for people, JSON for scripts, the confusion matrix as PNG.

`write_report(result, out_dir, title)` writes one run; `compare(a, b)` / `write_comparison(...)` put two
runs side by side (e.g. with and without biomarker estimates in the prompt), with b - a deltas.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from training.benchmark.classification import COLUMNS, ROWS, plot_confusion
from training.benchmark.evaluate import BenchmarkResult


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "benchmark"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _markdown(result: BenchmarkResult, title: str, png_name: str) -> str:
    """The Markdown page of one run."""
    lines = [f"# {title}", "", f"{result.n} cases.", "", "## Headline metrics", ""]
    lines += _table(["metric", "value"], [[k, _fmt(v)] for k, v in result.summary().items()])
    lines += ["", "## Diagnosis classification (7 labels; Indeterminate counts as wrong)", ""]
    lines += _table(
        ["label", "precision", "recall", "F1", "support", "predicted", "in macro-F1"],
        [
            [
                s.label,
                _fmt(s.precision),
                _fmt(s.recall),
                _fmt(s.f1),
                str(s.support),
                str(s.predicted),
                "yes" if s.support or s.predicted else "no (absent)",
            ]
            for s in result.classification.per_label
        ],
    )
    lines += ["", "Confusion matrix (rows: reference, columns: predicted):", ""]
    lines += _table(
        ["reference \\ predicted", *[c.value for c in COLUMNS]],
        [[label.value, *map(str, row)] for label, row in zip(ROWS, result.classification.confusion)],
    )
    lines += ["", f"![confusion matrix]({png_name})", "", "## Grounding (cited numbers vs the SR's estimates)", ""]
    lines += _table(
        ["quantity", "value"], [[k, str(v) if isinstance(v, int) else _fmt(v)] for k, v in result.grounding.items()]
    )
    if result.judge_means is not None or result.judge_failures:
        lines += [
            "",
            f"LLM judge: {result.n - result.judge_failures} cases judged, "
            f"{result.judge_failures} without a valid verdict.",
        ]
    lines += [
        "",
        "Definitions: `training/benchmark/` module docstrings (tokeniser, BLEU smoothing, rubric "
        "deductions, coverage keywords, grounding tolerance).",
    ]
    return "\n".join(lines) + "\n"


def write_report(result: BenchmarkResult, out_dir: Path | str, title: str) -> dict[str, Path]:
    """Write `<slug>.md`, `<slug>.json` and `<slug>-confusion.png` under `out_dir`; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = _slug(title)
    paths = {"markdown": out / f"{slug}.md", "json": out / f"{slug}.json", "png": out / f"{slug}-confusion.png"}
    plot_confusion(result.classification, paths["png"], title)
    paths["markdown"].write_text(_markdown(result, title, paths["png"].name), encoding="utf-8")
    payload = {"title": title, **result.to_dict()}
    paths["json"].write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
    return paths


@dataclass(frozen=True)
class Comparison:
    names: tuple[str, str]
    rows: list[tuple[str, float | None, float | None, float | None]]  #: metric, a, b, b - a

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "rows": [{"metric": m, self.names[0]: a, self.names[1]: b, "delta": d} for m, a, b, d in self.rows],
        }

    def to_markdown(self) -> list[str]:
        header = ["metric", self.names[0], self.names[1], f"{self.names[1]} - {self.names[0]}"]
        return _table(header, [[m, _fmt(a), _fmt(b), "n/a" if d is None else f"{d:+.4f}"] for m, a, b, d in self.rows])


def compare(result_a: BenchmarkResult, result_b: BenchmarkResult, names: tuple[str, str] = ("A", "B")) -> Comparison:
    """Headline metrics of two runs side by side (metrics of either run, in summary order)."""
    a, b = result_a.summary(), result_b.summary()
    metrics = list(dict.fromkeys([*a, *b]))
    rows = []
    for metric in metrics:
        va, vb = a.get(metric), b.get(metric)
        rows.append((metric, va, vb, None if va is None or vb is None else vb - va))
    return Comparison(names, rows)


def write_comparison(
    result_a: BenchmarkResult,
    result_b: BenchmarkResult,
    out_dir: Path | str,
    title: str,
    names: tuple[str, str] = ("A", "B"),
) -> dict[str, Path]:
    """Write both runs (`write_report`) and `<slug>.md` / `<slug>.json` with the comparison table."""
    out = Path(out_dir)
    slug = _slug(title)
    runs = {name: write_report(result, out, f"{title} {name}") for name, result in zip(names, (result_a, result_b))}
    comparison = compare(result_a, result_b, names)
    lines = [f"# {title}", "", f"{names[0]}: {result_a.n} cases; {names[1]}: {result_b.n} cases.", ""]
    lines += comparison.to_markdown()
    lines += ["", *[f"- {name}: [{paths['markdown'].name}]({paths['markdown'].name})" for name, paths in runs.items()]]
    paths = {"markdown": out / f"{slug}.md", "json": out / f"{slug}.json"}
    paths["markdown"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths["json"].write_text(json.dumps({"title": title, **comparison.to_dict()}, indent=2), encoding="utf-8")
    return paths
