"""Stage 1 (docs/domain.md, The GROK model): cohort manifest -> knowledge-guided instruction records (JSONL) + rejected
list.

Each eye of the chosen splits gets a report from a teacher (the deterministic guideline teacher, or an
OpenAI-compatible chat-completions model). Every report is validated (`validate_report`): one paragraph,
at most 300 words, a concluding sentence that names the eye's label and no other, at least
MIN_GROUNDED_NUMBERS numbers that grok_pacs.analysis.grounding ties to the right biomarker with the right value and
none that it cannot tie (an eye with fewer measured values: every one of them, and the report says what was
not measured, so an eye without measurements still gets its record; the record lists them in "not_measured"),
at least MIN_RULED_OUT other labels discussed, no hint that the label was given.
Valid records go to instructions.jsonl in the paper's format; the others to rejected.jsonl with reasons.

CLI: python -m training.stage1 --help
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from grok_pacs.analysis.grounding import find_citations
from grok_pacs.domain.biomarkers import BY_KEY, format_value, to_prompt_json
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, LABEL_SYNONYMS, Label
from training.manifest import SPLITS, CohortRecord, bscan_files, load_manifest
from training.stage1.teachers.knowledge import HUMAN_TURN, MIN_GROUNDED_NUMBERS, NOT_MEASURED

MAX_WORDS = 300
MIN_RULED_OUT = 3
RELATIVE_TOLERANCE = 0.02  #: a cited value may be rounded by up to 2% (or half its last written digit)
INSTRUCTIONS_NAME, REJECTED_NAME, SUMMARY_NAME = "instructions.jsonl", "rejected.jsonl", "stage1.json"

_LEAK = re.compile(
    r"\b(ground[- ]truth|(given|provided|hidden|true|correct|supplied) (label|diagnosis)|"
    r"label (is|was|provided|given)|as (instructed|stated in the prompt)|i was told)\b",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")


def record_id(subject_id: str, eye: str) -> str:
    """The id of an eye's record: `<subject>_<eye>` (stage 3's feature-store key)."""
    return f"{subject_id}_{eye}"


def _label_patterns() -> dict[Label, re.Pattern[str]]:
    out = {}
    for label in DIAGNOSTIC_LABELS:
        words = {label.value.lower(), *LABEL_SYNONYMS[label]}
        alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
        out[label] = re.compile(rf"(?<![a-z])({alternatives})(?![a-z])", re.IGNORECASE)
    return out


_LABEL_RE = _label_patterns()


def labels_named(text: str) -> set[Label]:
    """The diagnostic labels a text names (canonical names and grok_pacs.domain.labels synonyms)."""
    return {label for label, pattern in _LABEL_RE.items() if pattern.search(text)}


def concluding_sentence(text: str) -> str:
    sentences = [s for s in _SENTENCE_END.split(text.strip()) if s.strip()]
    return sentences[-1] if sentences else ""


def validate_report(text: str, label: Label, biomarkers: Mapping[str, float]) -> list[str]:
    """Everything wrong with a report for an eye with this label and these biomarkers (empty = valid)."""
    text = text.strip()
    if not text:
        return ["empty report"]
    problems = []
    if "\n" in text:
        problems.append("not a single paragraph (contains a line break)")
    words = len(text.split())
    if words > MAX_WORDS:
        problems.append(f"{words} words, more than {MAX_WORDS}")
    conclusion = concluding_sentence(text)
    named = labels_named(conclusion)
    if label not in named:
        problems.append(f"the concluding sentence does not name {label.value}: {conclusion!r}")
    if named - {label}:
        problems.append(
            f"the concluding sentence also names {', '.join(sorted(other.value for other in named - {label}))}"
        )
    leak = _LEAK.search(text)
    if leak:
        problems.append(f"reveals that the diagnosis was given ({leak.group(0)!r})")
    problems.extend(_number_problems(text, biomarkers))
    if measured_count(biomarkers) < MIN_GROUNDED_NUMBERS and NOT_MEASURED not in text.lower():
        problems.append(f"only {measured_count(biomarkers)} value(s) measured and the report does not say what was not")
    ruled_out = labels_named(text[: len(text) - len(conclusion)]) - {label}
    if len(ruled_out) < MIN_RULED_OUT:
        problems.append(f"discusses only {len(ruled_out)} other label(s), at least {MIN_RULED_OUT} must be ruled out")
    return problems


def measured_count(biomarkers: Mapping[str, float]) -> int:
    """How many biomarkers of an eye have a value (NaN or absent: not measured)."""
    return sum(1 for v in biomarkers.values() if v is not None and not math.isnan(float(v)))


def _number_problems(text: str, biomarkers: Mapping[str, float]) -> list[str]:
    problems, grounded = [], 0
    for c in find_citations(text):
        if c.biomarker_key is None:
            problems.append(f"the number {c.text} is tied to no biomarker")
            continue
        b = BY_KEY[c.biomarker_key]
        true = biomarkers.get(b.key)
        if true is None or math.isnan(float(true)):
            problems.append(f"{c.text} is cited for {b.key}, which has no value")
            continue
        if b.unit == "1" and c.unit in ("um", "mm"):
            problems.append(f"{c.text} is cited for the unitless {b.key} with a length unit")
            continue
        value = c.value_in_um if b.unit == "um" else c.value
        tolerance = max(abs(float(true)) * RELATIVE_TOLERANCE, 0.5 * 10**-c.decimals)
        if abs(value - float(true)) > tolerance:
            problems.append(f"{c.text} is cited for {b.key}, whose value is {format_value(b, float(true))}")
        else:
            grounded += 1
    needed = min(MIN_GROUNDED_NUMBERS, measured_count(biomarkers))  # an eye cannot cite what was not measured
    if grounded < needed:
        problems.append(f"only {grounded} number(s) tied to the biomarkers, at least {needed} needed")
    return problems


def instruction_record(record: CohortRecord, report: str, base: Path, teacher: str) -> dict:
    """The paper's record, `{"id", "image", "octs", "label", "conversations", "biomarkers"}`, plus the eye's keys.

    Paths are relative to `base` (the manifest's folder) when inside it; "octs" is the foveal B-scan when the
    OCT is a folder of images and the foveal frame is known, else the OCT path.
    """
    octs = record.oct_path
    if octs.is_dir() and record.fovea_frame is not None:
        frames = bscan_files(octs)
        octs = frames[record.fovea_frame] if record.fovea_frame < len(frames) else octs
    return {
        "id": record_id(record.subject_id, record.eye),
        "image": _relative(record.cfp_path, base),
        "octs": _relative(octs, base),
        "label": record.label.value,
        "conversations": [{"from": "human", "value": HUMAN_TURN}, {"from": "gpt", "value": report}],
        "biomarkers": json.loads(to_prompt_json(record.biomarkers)),
        "subject_id": record.subject_id,
        "eye": record.eye,
        "split": record.split,
        "fovea_frame": record.fovea_frame,
        "teacher": teacher,
        "not_measured": [k for k, v in record.biomarkers.items() if math.isnan(float(v))],
    }


def _relative(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


@dataclass(frozen=True)
class Stage1Result:
    instructions: Path
    rejected: Path
    summary: dict


def _write_reports(teacher, records: Sequence[CohortRecord], progress: bool) -> dict[str, str | Exception]:
    """id -> report text, or the exception the teacher raised for that eye."""
    if hasattr(teacher, "write_many"):
        return teacher.write_many(records, progress=progress)
    out: dict[str, str | Exception] = {}
    for record in tqdm(records, desc=f"stage 1 ({teacher.name})", unit="eye", disable=not progress):
        out[record_id(record.subject_id, record.eye)] = teacher.write(record)
    return out


def run_stage1(
    manifest: Path,
    out_dir: Path,
    teacher,
    *,
    splits: Sequence[str] = SPLITS,
    limit: int | None = None,
    drop_bad: bool = False,
    progress: bool = True,
) -> Stage1Result:
    """Write out_dir/instructions.jsonl, rejected.jsonl and stage1.json for the chosen splits."""
    start = time.monotonic()
    manifest = Path(manifest)
    records = [r for r in load_manifest(manifest, drop_bad=drop_bad) if r.split in splits][:limit]
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = _write_reports(teacher, records, progress)
    accepted, rejected = [], []
    for record in tqdm(records, desc="validating", unit="eye", disable=not progress):
        rid = record_id(record.subject_id, record.eye)
        report = reports.get(rid)
        if isinstance(report, Exception) or report is None:
            rejected.append({"id": rid, "label": record.label.value, "reasons": [f"teacher failed: {report}"]})
            continue
        problems = validate_report(report, record.label, record.biomarkers)
        if problems:
            rejected.append({"id": rid, "label": record.label.value, "reasons": problems, "report": report})
        else:
            accepted.append(instruction_record(record, report.strip(), manifest.parent, teacher.name))
    paths = [out_dir / INSTRUCTIONS_NAME, out_dir / REJECTED_NAME]
    for path, rows in zip(paths, (accepted, rejected)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    summary = _summary(manifest, teacher, records, accepted, rejected, time.monotonic() - start)
    (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return Stage1Result(paths[0], paths[1], summary)


def _summary(manifest: Path, teacher, records, accepted, rejected, seconds: float) -> dict:
    by_label = {lab.value: sum(1 for r in accepted if r["label"] == lab.value) for lab in DIAGNOSTIC_LABELS}
    words = [len(r["conversations"][1]["value"].split()) for r in accepted]
    return {
        "manifest": str(manifest.resolve()),
        "teacher": teacher.name,
        "eyes": len(records),
        "accepted": len(accepted),
        "rejected": len(rejected),
        "accepted_by_label": by_label,
        "mean_words": round(sum(words) / len(words), 1) if words else 0,
        "seconds": round(seconds, 1),
        "usage": teacher.usage() if hasattr(teacher, "usage") else {},
    }


def _teacher_from_args(args: argparse.Namespace):
    from training.stage1.teachers.guideline import GuidelineTeacher
    from training.stage1.teachers.knowledge import load_knowledge

    knowledge = load_knowledge(args.guideline) if args.guideline else load_knowledge()
    if args.teacher == "guideline":
        return GuidelineTeacher(knowledge)
    from training.stage1.teachers.openai_compat import ChatTeacher

    api_key = os.environ.get(args.api_key_env, "") if args.api_key_env else ""
    return ChatTeacher(
        args.base_url,
        args.model,
        knowledge,
        cache_dir=args.out / "cache",
        api_key=api_key,
        concurrency=args.concurrency,
        max_retries=args.retries,
        timeout_s=args.timeout,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.stage1",
        description="Stage 1: write knowledge-guided instruction records (paper format JSONL) for every eye of a "
        "cohort manifest, validate each report and list the rejected ones with their reasons. Outputs "
        "OUT/instructions.jsonl, OUT/rejected.jsonl and OUT/stage1.json (counts, words, token usage).",
    )
    parser.add_argument("--manifest", type=Path, required=True, help="cohort manifest.csv (docs/cohort-manifest.md)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--teacher",
        choices=("guideline", "openai"),
        default="guideline",
        help="guideline: deterministic, offline (default); openai: an OpenAI-compatible "
        "chat-completions server (o3, vLLM, llama.cpp) with the paper's prompt and images",
    )
    parser.add_argument("--splits", default=",".join(SPLITS), help="comma-separated splits to include (default all)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many eyes (for a trial run)")
    parser.add_argument("--drop-bad", action="store_true", help="skip broken manifest rows instead of refusing")
    parser.add_argument("--guideline", type=Path, default=None, help="Eye-Guideline YAML (default: the packaged one)")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="openai: server base URL (…/v1)")
    parser.add_argument("--model", default="o3", help="openai: model name (default o3)")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai: environment variable with the key")
    parser.add_argument("--concurrency", type=int, default=4, help="openai: requests in flight (default 4)")
    parser.add_argument("--retries", type=int, default=5, help="openai: retries per record with backoff (default 5)")
    parser.add_argument("--timeout", type=float, default=300.0, help="openai: seconds per request (default 300)")
    args = parser.parse_args(argv)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not set(splits) <= set(SPLITS):
        parser.error(f"--splits must be among {', '.join(SPLITS)}")
    result = run_stage1(
        args.manifest, args.out, _teacher_from_args(args), splits=splits, limit=args.limit, drop_bad=args.drop_bad
    )
    print(json.dumps(result.summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
