"""The narrative validator (grok_pacs.analysis.validation): degenerate texts of issue 14 fail with the
right coded reason, healthy reports (hand-written, the tiny bundle's, the guideline teacher's) pass."""

from __future__ import annotations

import numpy as np
import pytest

from devtools.tiny_bundle import TINY_REPORT
from grok_pacs.analysis.validation import REASON_TEXT, NarrativeCheck, Reason, ValidationLimits, validate_narrative
from grok_pacs.domain.biomarkers import BIOMARKERS, CFP_KEYS
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS
from grok_pacs.model.prompt import format_target
from tests.helpers.teacher_reports import guideline_targets

HEALTHY = format_target(
    "The optic disc is healthy with a cup-to-disc ratio of 0.310. The average retinal nerve fibre layer (RNFL) "
    "thickness is 29.8 um and the central subfield thickness is 252.0 um, both within normal limits. "
    "The periphery shows no haemorrhages, microaneurysms or exudates. The vessels are unremarkable, with an "
    "arteriolar-to-venular ratio of 0.781. These findings are those of a normal retina.",
    "Normal",
)
ESTIMATES = {b.key: float(np.mean(b.normal)) for b in BIOMARKERS}


def test_healthy_report_passes() -> None:
    check = validate_narrative(HEALTHY, ESTIMATES)
    assert check.passed and check.issues == () and check.reasons == ()
    assert check.repeated_sentences == 0 and check.distinct_2 > 0.9 and 40 < check.words < 80
    assert check.summary() == "passed"
    assert validate_narrative(TINY_REPORT).passed  # what the tiny test bundle writes


@pytest.mark.parametrize("label", DIAGNOSTIC_LABELS)
def test_every_guideline_teacher_report_passes(label) -> None:
    """The training targets must pass, or the validator would withhold a model that learnt them well."""
    for target, biomarkers in guideline_targets(label, 6, seed=9, prefix="V"):
        check = validate_narrative(target, biomarkers)
        assert check.passed, check.summary()


def test_findings_that_conclude_another_label_than_their_diagnosis_line_fail() -> None:
    """What the demo's 135M model once wrote: an argument for hypertensive retinopathy under "Diagnosis: AMD"."""
    body = HEALTHY.split("\nDiagnosis:")[0].replace("those of a normal retina", "those of hypertensive retinopathy")
    check = validate_narrative(format_target(body, "AMD"), ESTIMATES)
    assert check.reasons == (Reason.CONTRADICTS_DIAGNOSIS,)
    assert "hypertensive retinopathy" in check.issues[0].detail and "AMD" in check.issues[0].detail
    assert validate_narrative(format_target(body, "Hypertension"), ESTIMATES).passed  # the same words, agreeing
    several = body.replace("those of hypertensive retinopathy", "AMD rather than glaucoma")
    assert validate_narrative(format_target(several, "AMD"), ESTIMATES).passed  # names two: left alone


def test_phrase_repeated_twelve_times_fails() -> None:
    phrase = "no haemorrhages, microaneurysms or exudates"
    text = "The retina shows " + ", ".join([phrase] * 12) + ". Diagnosis: Normal"
    check = validate_narrative(text)
    assert not check.passed and check.reasons == (Reason.REPEATED_PHRASE,)
    assert "haemorrhages microaneurysms" in check.issues[0].detail
    spread = "The retina shows " + ", ".join(f"{phrase} in zone {i}" for i in range(12)) + ". Diagnosis: Normal"
    check = validate_narrative(spread)  # never twice in a row, but 12 times
    assert check.reasons == (Reason.REPEATED_PHRASE,) and "12 times" in check.issues[0].detail


def test_repeated_sentence_fails_and_is_counted() -> None:
    sentence = "The periphery shows no haemorrhages, microaneurysms or exudates. "
    check = validate_narrative("The disc is healthy. " + sentence * 3 + "\nDiagnosis: Normal")
    assert Reason.REPEATED_SENTENCE in check.reasons and check.repeated_sentences == 2
    assert check.summary().startswith("a sentence is repeated: 'the periphery shows")


def test_runaway_digits_fail_but_a_number_ending_a_sentence_does_not() -> None:
    runaway = HEALTHY.replace("0.310.", "0.375.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.")
    check = validate_narrative(runaway)
    assert check.reasons == (Reason.MALFORMED_NUMBER,)
    assert "0.375.0.0" in check.issues[0].detail
    long_digits = validate_narrative(HEALTHY.replace("0.310", "0.3100000000"))
    assert long_digits.reasons == (Reason.MALFORMED_NUMBER,)
    assert validate_narrative(HEALTHY).passed  # "ratio of 0.310. The average" is a sentence end, not a number


@pytest.mark.parametrize(
    ("tail", "reason"),
    [
        ("", Reason.MISSING_DIAGNOSIS),
        ("\nDiagnosis: Cataract", Reason.INVALID_DIAGNOSIS),
        ("\nDiagnosis: Glaucoma or AMD", Reason.INVALID_DIAGNOSIS),
    ],
)
def test_missing_or_invalid_diagnosis_line_fails(tail: str, reason: Reason) -> None:
    narrative = HEALTHY.split("\nDiagnosis:")[0]
    assert validate_narrative(narrative + tail).reasons == (reason,)


def test_length_limits() -> None:
    assert validate_narrative("Healthy disc.\nDiagnosis: Normal").reasons == (Reason.TOO_SHORT,)
    words = " ".join(f"word{i}" for i in range(500))
    check = validate_narrative(f"{words}.\nDiagnosis: Normal")
    assert check.reasons == (Reason.TOO_LONG,) and check.words == 500
    assert validate_narrative(f"{words}.\nDiagnosis: Normal", limits=ValidationLimits(max_words=600)).passed


def test_value_outside_plausible_range_fails() -> None:
    check = validate_narrative(HEALTHY.replace("0.310", "1.310"))
    assert check.reasons == (Reason.IMPLAUSIBLE_VALUE,) and "cup-to-disc ratio 1.310" in check.issues[0].detail


def test_value_cited_for_an_unmeasured_biomarker_fails_only_with_estimates() -> None:
    cfp_only = {key: ESTIMATES[key] for key in CFP_KEYS}  # no OCT for this eye, yet the text cites RNFL
    check = validate_narrative(HEALTHY, cfp_only)
    assert check.reasons == (Reason.UNMEASURED_VALUE,)
    assert "retinal nerve fibre layer" in check.summary().lower()
    assert validate_narrative(HEALTHY).passed


def test_junk_never_raises_and_fails() -> None:
    for junk in ("", "\x00\x01", "<|im_end|>" * 5, "0" * 200, "Diagnosis:" * 40):
        check = validate_narrative(junk)
        assert not check.passed and all(issue.text.startswith(REASON_TEXT[issue.reason]) for issue in check.issues)


def test_check_and_limits_are_typed_and_refuse_contradictions() -> None:
    with pytest.raises(ValueError, match="contradicts"):
        NarrativeCheck(True, (validate_narrative("").issues[0],), 0, 0, 1.0)
    with pytest.raises(ValueError, match="min_words"):
        ValidationLimits(min_words=0)
    with pytest.raises(ValueError, match="max_words"):
        ValidationLimits(min_words=50, max_words=10)


def test_a_phrase_written_twice_in_a_row_fails() -> None:
    """What the phantom stand-in model wrote: the phrase three times, each time back to back."""
    text = HEALTHY.replace(
        "no haemorrhages, microaneurysms or exudates",
        "no haemorrhages, microaneurysms or exudates no haemorrhages, microaneurysms or exudates",
    )
    check = validate_narrative(text)
    assert check.reasons == (Reason.REPEATED_PHRASE,) and "twice in a row" in check.summary()
    assert validate_narrative(HEALTHY.replace("is healthy", "is very, very healthy")).passed  # one word: fine
