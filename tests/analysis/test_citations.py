"""grok_pacs.analysis.grounding: numbers a report cites, tied to the biomarker they describe."""

from __future__ import annotations

import pytest

from grok_pacs.analysis.grounding import ALIASES, extract_cited_numbers, find_citations, ground_cited_numbers
from grok_pacs.analysis.result import CitedNumber
from grok_pacs.domain.biomarkers import BIOMARKERS, BY_KEY, format_value


def keys(text: str) -> list[tuple[str, str | None]]:
    return [(c.text, c.biomarker_key) for c in find_citations(text)]


def test_alias_table_covers_every_biomarker() -> None:
    assert set(ALIASES) == set(BY_KEY)


@pytest.mark.parametrize(
    "phrase", ["{name} of {value}{unit}.", "The {prompt} measures {value}.", "{name}: {value}{unit}; stable."]
)
def test_every_spec_name_is_matched(phrase: str) -> None:
    for b in BIOMARKERS:
        value = format_value(b, sum(b.normal) / 2)
        text = phrase.format(name=b.name, prompt=b.prompt_name, value=value, unit=" µm" if b.unit == "um" else "")
        assert keys(text) == [(value, b.key)], text


def test_all_37_in_one_paragraph_keep_their_own_biomarker() -> None:
    parts = [f"{b.name} is {format_value(b, sum(b.normal) / 2)}{' um' if b.unit == 'um' else ''}" for b in BIOMARKERS]
    found = find_citations(", ".join(parts) + ".")
    assert [c.biomarker_key for c in found] == [b.key for b in BIOMARKERS]


def test_teacher_phrasings() -> None:
    text = (
        "The cup-to-disc ratio of 0.720 is enlarged, and RNFL thickness 24.1 µm and GCIPL 61.2 um are "
        "thin; central subfield thickness of 312.4 um. INL-ELM central subfield thickness of 99.1 um, "
        "ISOS-RPE thickness at the outer subfield is 33.0 um and the A/V ratio is 0.61; arteriolar "
        "tortuosity 1.18, venular tortuosity of 1.12, the inner superior macular thickness of 320.5 um, "
        "and the tortuosity of the arterioles is 1.2."
    )
    assert keys(text) == [
        ("0.720", "cup_to_disc"),
        ("24.1", "rnfl_average"),
        ("61.2", "gcipl_average"),
        ("312.4", "mt_central"),
        ("99.1", "inl_elm_central"),
        ("33.0", "isos_rpe_outer"),
        ("0.61", "avr"),
        ("1.18", "tortuosity_arterial"),
        ("1.12", "tortuosity_venular"),
        ("320.5", "mt_inner_superior"),
        ("1.2", "tortuosity_arterial"),
    ]


def test_filler_cannot_borrow_another_biomarkers_qualifier() -> None:
    text = "Venular tortuosity increased with arterial fractal dimension 1.38; arterial and venular FD 1.41."
    assert keys(text) == [("1.38", "fd_arterial"), ("1.41", "fd_venular")]


def test_units_are_read() -> None:
    found = find_citations("RNFL 24.1um, vertical disc diameter 1.82 mm, AVR 0.61, BP 150/95 mmHg.")
    assert [(c.text, c.unit, c.biomarker_key) for c in found] == [
        ("24.1", "um", "rnfl_average"),
        ("1.82", "mm", "disc_diameter_vertical"),
        ("0.61", None, "avr"),
        ("150", "other", None),
    ]
    assert found[1].value_in_um == pytest.approx(1820.0)
    assert find_citations("disc diameter 1,820 um")[0].value == 1820.0


def test_numbers_that_are_not_values_are_skipped() -> None:
    text = (
        "A 6 x 6 mm scan, ICD-10 H35.3, 3D imaging, 3 quadrants, 2 disc diameters, 15% thinner. "
        "Normal range 0.2-0.5; above the 0.6 threshold; normal: 25 um; between 30 and 40."
    )
    assert keys(text) == []


def test_normal_at_value_is_still_a_value_and_age_is_unmatched() -> None:
    text = "The cup-to-disc ratio is normal at 0.35 in this 67-year-old."
    assert keys(text) == [("0.35", "cup_to_disc"), ("67", None)]
    assert keys("The RNFL is thin, and the patient is 67 years old.") == [("67", None)]
    text = "RNFL within normal limits (28.0 um) but the AVR is below normal (0.55)."
    assert keys(text) == [("28.0", "rnfl_average"), ("0.55", "avr")]


def test_number_before_its_name() -> None:
    assert keys("0.72 cup-to-disc ratio was seen.") == [("0.72", "cup_to_disc")]


def test_extract_cited_numbers_returns_report_type() -> None:
    assert extract_cited_numbers("AVR 0.610 and something 7.") == [
        CitedNumber("0.610", 0.61, "avr"),
        CitedNumber("7", 7.0, None),
    ]


def test_shared_measures_and_lists() -> None:
    text = (
        "The arterial (1.121) and venular (1.098) tortuosity are normal; arterial and venular fractal "
        "dimensions of 1.412 and 1.398. INL-ELM thickness central 100.2, inner 90.1 and outer 75.3 um. "
        "The RNFL and GCIPL measure 24.1 and 62.3 um, respectively."
    )
    assert [k for _, k in keys(text)] == [
        "tortuosity_arterial",
        "tortuosity_venular",
        "fd_arterial",
        "fd_venular",
        "inl_elm_central",
        "inl_elm_inner",
        "inl_elm_outer",
        "rnfl_average",
        "gcipl_average",
    ]


def test_list_without_a_list_of_names_keeps_the_one_name() -> None:
    text = "RNFL and GCIPL thinning with cup-to-disc ratio 0.72 and 0.70. INL-ELM inner 90.1, ELM-ISOS central 25.0."
    assert [k for _, k in keys(text)] == ["cup_to_disc", "cup_to_disc", "inl_elm_inner", "elm_isos_central"]


def test_grounding_writes_disagreeing_numbers_as_the_estimates_and_keeps_the_rest() -> None:
    text = (
        "The cup-to-disc ratio of 0.72 is enlarged; the average RNFL thickness is 24.1 um and the vertical "
        "disc diameter is 1.76 mm. Intraocular pressure 21 mmHg, age 64 years."
    )
    estimates = {"cup_to_disc": 0.6149, "rnfl_average": 24.08, "disc_diameter_vertical": 1912.0}
    grounded, rewritten = ground_cited_numbers(text, estimates)
    assert rewritten == 2  # 24.1 already agrees with 24.08 as written: untouched
    assert grounded == (
        "The cup-to-disc ratio of 0.615 is enlarged; the average RNFL thickness is 24.1 um and the "
        "vertical disc diameter is 1.91 mm. Intraocular pressure 21 mmHg, age 64 years."
    )
    assert ground_cited_numbers(grounded, estimates) == (grounded, 0)


def test_grounding_leaves_numbers_without_an_estimate() -> None:
    text = "The cup-to-disc ratio of 0.72 is enlarged."
    assert ground_cited_numbers(text, {}) == (text, 0)
    assert ground_cited_numbers(text, {"cup_to_disc": float("nan")}) == (text, 0)
