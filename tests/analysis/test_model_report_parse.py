"""Report parsing of valid, truncated and nonsense generations: never crashes, never an invalid label."""

from __future__ import annotations

import random

import pytest

from grok_pacs.analysis.parsing import parse_generation
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label

VALID = (
    "The optic disc shows a cup-to-disc ratio of 0.72 with inferior rim thinning. The average retinal nerve "
    "fibre layer (RNFL) thickness is 24.1 um, below normal. These findings indicate glaucoma.\n"
    "Diagnosis: Glaucoma"
)


def test_valid_generation():
    parsed = parse_generation(VALID + "<|im_end|>")
    assert parsed.label == Label.GLAUCOMA and parsed.label_found
    assert parsed.narrative.startswith("The optic disc") and "Diagnosis" not in parsed.narrative
    assert parsed.impression == "These findings indicate glaucoma."
    assert parsed.raw_text == VALID + "<|im_end|>"
    cited = {(c.value, c.biomarker_key) for c in parsed.cited_numbers}
    assert (0.72, "cup_to_disc") in cited and (24.1, "rnfl_average") in cited


@pytest.mark.parametrize(
    "line, label",
    [
        ("Diagnosis: DiabeticRetinopathy", Label.DIABETIC_RETINOPATHY),
        ("**Diagnosis:** diabetic retinopathy (moderate NPDR).", Label.DIABETIC_RETINOPATHY),
        ("Diagnosis: Diabetes", Label.DIABETES),
        ("diagnosis - age-related macular degeneration (wet)", Label.AMD),
        ("Final diagnosis: normal.", Label.NORMAL),
        ("Diagnosis: Alzheimer's disease", Label.ALZHEIMER),
    ],
)
def test_diagnosis_line_variants(line, label):
    assert parse_generation(f"Findings.\n{line}").label == label


@pytest.mark.parametrize(
    "text",
    [
        VALID[: VALID.index("Diagnosis")],  # truncated before the diagnosis line
        VALID[: VALID.index("Diagnosis") + 11],  # truncated inside it ("Diagnosis: ")
        "Diagnosis: Cataract",  # not one of the labels
        "Diagnosis: Glaucoma or Hypertension",  # ambiguous
        "Diagnosis: Indeterminate",  # never a model label
        "",
        "<|im_end|>",
        "%%%% 12.5 ;;; \x00\x1b[31m",
    ],
)
def test_truncated_or_nonsense_gives_indeterminate_and_keeps_the_text(text):
    parsed = parse_generation(text)
    assert parsed.label == Label.INDETERMINATE and not parsed.label_found
    assert parsed.raw_text == text


def test_the_last_diagnosis_counts_and_earlier_mentions_stay_in_the_narrative():
    parsed = parse_generation("The differential diagnosis: glaucoma vs normal. Thin RNFL. Diagnosis: Glaucoma")
    assert parsed.label == Label.GLAUCOMA
    assert parsed.narrative == "The differential diagnosis: glaucoma vs normal. Thin RNFL."


def test_random_text_never_crashes_or_gives_an_invalid_label():
    rng = random.Random(0)
    alphabet = (
        "abcdefgh Diagnosis:.\n0123456789*-<>|_"
        + "".join(label.value for label in DIAGNOSTIC_LABELS)
        + "\u00e9\u2013\ud7ff"
    )
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        parsed = parse_generation(text)
        assert parsed.label in Label and parsed.raw_text == text
