"""What the language model adds (issue 32, item 6): its findings beside the guideline teacher's, written from the
same decided label and the same served estimates, scored the same way."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from grok_pacs.analysis.validation import validate_narrative
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label
from training.benchmark.teacher import LM, TEACHER, by_teacher, lm_vs_teacher, writers_markdown
from training.phantom.sampling import sample_subject
from training.records import Reference


def _eye(index: int, label: Label) -> tuple[str, dict[str, float]]:
    eye = sample_subject(f"PH-{index}", label, np.random.default_rng(index)).eyes[0]
    return f"PH-{index}_OD", dict(eye.biomarkers)


def _report(text: str, label: Label, estimates: dict[str, float], *, written: bool = True):
    """What lm_vs_teacher reads of a runtime Report."""
    return SimpleNamespace(
        raw_text=text if written else "",
        text=text,
        narrative_check=validate_narrative(text, estimates) if written else None,
        biomarkers=[SimpleNamespace(key=k, value=v) for k, v in estimates.items()],
        label=label,
        unsupported_label=None,
    )


def test_the_teacher_writes_the_form_the_model_was_trained_on_and_passes_the_validator():
    for index, label in enumerate(DIAGNOSTIC_LABELS):
        case, values = _eye(index, label)
        written = by_teacher(case, label, values)
        assert written.text.rstrip().endswith(f"Diagnosis: {label.value}")
        check = validate_narrative(written.own, values)
        assert check.passed, (label, check.issues)


def test_side_by_side_scores_both_writers_on_the_same_eyes_and_counts_the_rest():
    eyes = [_eye(i, label) for i, label in enumerate(DIAGNOSTIC_LABELS)]
    refs = [
        Reference(case, label, by_teacher(case, label, v).text, v) for (case, v), label in zip(eyes, DIAGNOSTIC_LABELS)
    ]
    looping = "The retina shows " + ", ".join(["no haemorrhages or exudates"] * 12) + ".\nDiagnosis: Normal"
    reports = [_report(looping, label, v) for (_, v), label in zip(eyes, DIAGNOSTIC_LABELS)]
    reports[0] = _report(looping, Label.NORMAL, eyes[0][1], written=False)  # ungradable: nothing written
    reports[1] = _report(looping, Label.INDETERMINATE, eyes[1][1])  # no decided label: nothing to write from
    side = lm_vs_teacher([case for case, _ in eyes], reports, refs)
    assert side["n"] == len(DIAGNOSTIC_LABELS) - 2 and side["left_out"] == 2
    lm, teacher = side["writers"][LM], side["writers"][TEACHER]
    assert lm["n"] == teacher["n"] == side["n"]
    assert teacher["validator_passed_share"] == 1.0 and teacher["own_grounding"] == 1.0
    assert lm["validator_passed_share"] == 0.0  # the looping findings fail the validator, as served they are withheld
    assert teacher["rouge_l_mean"] > lm["rouge_l_mean"]
    assert lm["own_grounding"] is None  # the looping findings cite no number
    table = writers_markdown(side)
    assert "passing the narrative validator" in table and "5 eyes; 2 left out" in table
