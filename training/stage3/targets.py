"""Stage-3 targets that cite what the runtime will show: the biomarker heads' estimates, not the measurements.

At serving time the prompt carries the heads' estimates and the SR carries the same numbers, so a report is
grounded when it cites exactly those. Stage-1 reports cite the measured (ground-truth) biomarkers. With
`biomarker_estimates`, stage 3 therefore trains on reports that cite each eye's head estimates (predicted
for that eye by the same heads the bundle serves): the deterministic guideline teacher simply writes the
report again from the estimates; a report from another teacher (o3, ...) keeps its words and has every
number that `grok_pacs.analysis.grounding` ties to a biomarker written as that biomarker's estimate
(`ground_cited_numbers`, the same rewrite the runtime applies).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from grok_pacs.analysis.grounding import ground_cited_numbers
from grok_pacs.domain.biomarkers import BY_KEY
from grok_pacs.domain.labels import Label, parse_label

GUIDELINE = "guideline"


@dataclass(frozen=True)
class TeacherEye:
    """What the guideline teacher reads of an eye (its EyeRecord protocol)."""

    subject_id: str
    eye: str
    label: Label
    biomarkers: Mapping[str, float]
    meta: Mapping[str, str] = field(default_factory=dict)


def _reply(record: Mapping[str, Any]) -> tuple[int, str]:
    for index, turn in enumerate(record["conversations"]):
        if turn.get("from") in ("gpt", "assistant"):
            return index, str(turn["value"])
    raise ValueError(f"record {record.get('id')!r} has no assistant turn")


def concise_measured(records: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Copies of `records` with the guideline teacher's concise report written from the measured biomarkers
    (for a model trained without estimates in its prompt); other teachers' records are kept as they are."""
    from training.records import biomarkers_from_prompt_json
    from training.stage1.teachers.guideline import GuidelineTeacher

    teacher = GuidelineTeacher()
    out = []
    for record in records:
        if record.get("teacher") != GUIDELINE or "subject_id" not in record or "biomarkers" not in record:
            out.append(dict(record))
            continue
        measured = biomarkers_from_prompt_json(record["biomarkers"])
        eye = TeacherEye(str(record["subject_id"]), str(record["eye"]), parse_label(str(record["label"])), measured)
        index, _ = _reply(record)
        turns = [dict(t) for t in record["conversations"]]
        turns[index]["value"] = teacher.write(eye, concise=True)
        out.append({**record, "conversations": turns})
    return out


def estimate_grounded(
    records: Sequence[Mapping[str, Any]], estimates: Mapping[str, Mapping[str, float]], *, concise: bool = False
) -> list[dict]:
    """Copies of `records` whose reports cite the estimates of `estimates[record id]`.

    `concise`: the guideline teacher writes its concise report (other teachers' reports keep their length).
    """
    from training.stage1.teachers.guideline import GuidelineTeacher

    teacher = GuidelineTeacher()
    out = []
    for record in records:
        rid = str(record["id"])
        values = estimates[rid]
        index, text = _reply(record)
        if record.get("teacher") == GUIDELINE and "subject_id" in record and "eye" in record:
            eye = TeacherEye(str(record["subject_id"]), str(record["eye"]), parse_label(str(record["label"])), values)
            text = teacher.write(eye, concise=concise)
        else:
            text, _ = ground_cited_numbers(text, values)
        turns = [dict(t) for t in record["conversations"]]
        turns[index]["value"] = text
        out.append({**record, "conversations": turns, "target_biomarkers": "estimates"})
    return out


def jittered_variants(
    records: Sequence[Mapping[str, Any]], copies: int, noise: float, seed: int = 0
) -> list[tuple[dict, dict[str, float]]]:
    """`copies` extra (record, biomarkers) pairs per guideline record, for the stand-in's pretraining corpus.

    Each copy jitters every measured biomarker by `noise` training-set standard deviations (clipped to the
    plausible range) and has the guideline teacher write the report again from the jittered values, with
    the record's label: more text of the same kind, with numbers that vary, so that the stand-in learns to
    cite the values its prompt gives and to read a label from imperfect values. Records from other
    teachers get no copies (their reports cannot be rewritten consistently).
    """
    import numpy as np

    from training.records import biomarkers_from_prompt_json
    from training.stage1.teachers.guideline import GuidelineTeacher

    guided = [r for r in records if r.get("teacher") == GUIDELINE and "subject_id" in r and "biomarkers" in r]
    if copies <= 0 or not guided:
        return []
    values = [biomarkers_from_prompt_json(r["biomarkers"]) for r in guided]
    keys = sorted({k for v in values for k in v})
    spread = {k: float(np.nanstd([v.get(k, math.nan) for v in values])) for k in keys}
    rng = np.random.default_rng(seed)
    teacher = GuidelineTeacher()
    out = []
    for copy in range(copies):
        for record, measured in zip(guided, values):
            jittered = {}
            for key, value in measured.items():
                low, high = BY_KEY[key].plausible
                jittered[key] = float(min(max(value + noise * spread[key] * rng.standard_normal(), low), high))
            eye = TeacherEye(
                str(record["subject_id"]), f"{record['eye']}~{copy}", parse_label(str(record["label"])), jittered
            )
            index, _ = _reply(record)
            turns = [dict(t) for t in record["conversations"]]
            turns[index]["value"] = teacher.write(eye)
            out.append(({**record, "conversations": turns}, jittered))
    return out
