"""AMD's subtype from the estimates (grok_pacs.domain.subtypes): one criterion that the teacher writes by, the
narrative validator holds the model's words to and the default referral table reads."""

from __future__ import annotations

import math

import pytest

from grok_pacs.analysis.result import Action
from grok_pacs.analysis.validation import Reason, validate_narrative
from grok_pacs.domain.biomarkers import BIOMARKERS
from grok_pacs.domain.labels import Label
from grok_pacs.domain.subtypes import WET_AMD_SIGNS, amd_subtype, stated_subtypes
from grok_pacs.model.prompt import format_target
from grok_pacs.report.dispositions import DEFAULT_TABLE
from training.stage1.teachers.knowledge import load_knowledge

NORMAL = {b.key: sum(b.normal) / 2 for b in BIOMARKERS}
DRY = NORMAL | {"isos_rpe_central": 56.0, "mt_central": 274.0, "rpe_average": 38.0}  # PH7-00008's estimates
WET = NORMAL | {"isos_rpe_central": 118.0, "mt_central": 352.0, "rpe_average": 41.0}

#: The demo's narrative of 2026-12-02 (subject PH7-00008, a dry AMD eye): wet lesions, a routine referral.
WET_WORDS = format_target(
    "The macula shows soft drusen with a dark subretinal haemorrhage and a grey-green membrane, with a "
    "central IS/OS-RPE thickness of 56.0 um. These findings are those of neovascular (wet) age-related "
    "macular degeneration.",
    "AMD",
)
DRY_WORDS = format_target(
    "Soft yellow drusen cluster around the fovea, with a central IS/OS-RPE thickness of 56.0 um and no "
    "subretinal fluid. These findings are those of dry age-related macular degeneration (AMD).",
    "AMD",
)


def test_the_estimates_read_wet_on_any_sign_dry_only_when_every_sign_was_measured() -> None:
    assert amd_subtype(DRY) == "dry" and amd_subtype(WET) == "wet"
    assert amd_subtype(DRY | {"isos_rpe_central": 90.0}) == "wet"  # fluid under the fovea, no thickening
    assert amd_subtype(DRY | {"mt_central": 310.0}) == "wet"  # thickening, no fluid
    assert amd_subtype(DRY | {"isos_rpe_central": math.nan}) is None  # no OCT: the words cannot be checked
    assert amd_subtype({}) is None


@pytest.mark.parametrize(
    "text, said",
    [
        ("a dark subretinal haemorrhage at the macula", {"wet": "subretinal haemorrhage"}),
        ("neovascular (wet) age-related macular degeneration", {"wet": "neovascular"}),
        ("non-neovascular (dry) age-related macular degeneration", {"dry": "non-neovascular"}),
        ("soft drusen and no subretinal fluid; dry AMD", {"dry": "dry"}),
        ("without drusen, haemorrhage or subretinal fluid", {}),
        ("the periphery is free of haemorrhages and exudates", {}),
    ],
)
def test_the_words_that_state_a_subtype_and_negations_that_do_not(text: str, said: dict[str, str]) -> None:
    assert stated_subtypes(text) == said


def test_a_narrative_the_estimates_contradict_is_withheld_with_the_evidence() -> None:
    check = validate_narrative(WET_WORDS, DRY)
    assert not check.passed and check.reasons == (Reason.CONTRADICTS_ESTIMATES,)
    detail = check.issues[0].detail
    assert "subretinal haemorrhage" in detail and "show dry" in detail and "56.0" in detail and "274.0" in detail
    reverse = validate_narrative(DRY_WORDS.replace("56.0", "118.0"), WET)
    assert reverse.reasons == (Reason.CONTRADICTS_ESTIMATES,) and "show wet" in reverse.issues[0].detail
    one_sign = validate_narrative(DRY_WORDS.replace("56.0", "118.0"), WET | {"mt_central": math.nan})
    assert one_sign.reasons == (Reason.CONTRADICTS_ESTIMATES,) and "not measured" in one_sign.issues[0].detail


def test_a_narrative_that_agrees_or_cannot_be_checked_passes() -> None:
    assert validate_narrative(DRY_WORDS, DRY).passed
    proliferative = format_target(
        "Neovascularisation of the disc with dot-blot haemorrhages and hard exudates at the posterior pole.",
        "DiabeticRetinopathy",
    )
    assert validate_narrative(proliferative, DRY).passed  # not AMD: not an AMD subtype
    assert validate_narrative(WET_WORDS.replace("56.0", "118.0"), WET).passed
    assert validate_narrative(WET_WORDS).passed  # no estimates given: the rule is off
    assert validate_narrative(WET_WORDS, DRY | {"isos_rpe_central": math.nan}).reasons == (Reason.UNMEASURED_VALUE,)


def test_the_teacher_writes_wet_by_the_first_sign() -> None:
    """Stage 1's fallback (an eye without a known subtype) is the validator's and the referral's first sign."""
    key, above = load_knowledge().labels[Label.AMD].wet_if
    first = WET_AMD_SIGNS[0]
    assert (key, first.op, above) == (first.key, ">", first.value)


def test_the_default_table_refers_every_wet_sign_urgently() -> None:
    urgent = [r for r in DEFAULT_TABLE if r.label == "AMD" and r.biomarker is not None]
    assert [(r.biomarker, r.op, r.value) for r in urgent] == [(s.key, s.op, s.value) for s in WET_AMD_SIGNS]
    assert all(r.action is Action.URGENT_REFERRAL and "neovascular" in r.text for r in urgent)
