"""Training targets written by the guideline teacher (stage 1), as the narrative checks must accept them."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np

from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label
from grok_pacs.model.prompt import format_target
from training.phantom.sampling import sample_subject
from training.stage1.teachers.guideline import GuidelineTeacher


def guideline_targets(label: Label, count: int, seed: int, prefix: str) -> Iterator[tuple[str, dict[str, float]]]:
    """`count` assistant targets (report + "Diagnosis:" line) for phantom eyes of `label`, with their biomarkers;
    subjects are named `prefix` + index."""
    teacher = GuidelineTeacher()
    for i in range(count):
        truth = sample_subject(f"{prefix}{i}", label, np.random.default_rng([seed, i, DIAGNOSTIC_LABELS.index(label)]))
        eye = truth.eyes[i % 2]
        record = SimpleNamespace(
            subject_id=truth.subject_id,
            eye=eye.eye,
            label=label,
            biomarkers=eye.biomarkers,
            meta={"subtype": eye.subtype},
        )
        yield format_target(teacher.write(record), label), eye.biomarkers
