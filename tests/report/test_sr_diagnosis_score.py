"""The diagnosis as OHIF's SR viewport shows it: the first NUM of an eye's first measurement group.

OHIF draws a group's first NUMs ("name: value unit") and never its coded diagnosis or tracking identifier
(docs/domain.md, Display), so a gradable eye's SR carries the diagnosis' score there
("Probability of Glaucoma (AI): 87 %"); an eye that was not gradable carries none, so no diagnosis can be drawn for
it. The SR stays dciodvfy clean.
"""

from __future__ import annotations

import dataclasses

import pydicom
import pytest

from grok_pacs.analysis.result import Eye, Gradability
from grok_pacs.domain.labels import Label
from grok_pacs.report.sr import SRBuildError, SRKey, build_sr
from tests.helpers.ophthalmic_dicom import Patient, make_cfp, make_oct
from tests.helpers.srcheck import assert_valid_sr
from tests.report.test_sr import _groups, _report, _save, _source

SCORES = {"Glaucoma": 0.87, "AMD": 0.05, "Normal": 0.31}


def _nums(item) -> list[tuple[str, str, float, str]]:
    """(code value, meaning, value, unit) of every NUM under `item`, in document order."""
    out = []
    for child in item.get("ContentSequence", []):
        if child.ValueType == "NUM":
            measured = child.MeasuredValueSequence[0]
            out.append(
                (
                    child.ConceptNameCodeSequence[0].CodeValue,
                    child.ConceptNameCodeSequence[0].CodeMeaning,
                    float(measured.NumericValue),
                    measured.MeasurementUnitsCodeSequence[0].CodeValue,
                )
            )
        out.extend(_nums(child))
    return out


def _built(tmp_path, label: Label, **changes) -> tuple[pydicom.Dataset, str]:
    patient = Patient()
    cfp, oct_ds = make_cfp(patient, "R"), make_oct(patient, "R")
    report = dataclasses.replace(_report(Eye.RIGHT, label, [_source(cfp), _source(oct_ds, 4)]), **changes)
    path = _save(build_sr(report, [cfp, oct_ds], SRKey(patient.study_uid, 1, "0.1.0", Eye.RIGHT)), tmp_path)
    return pydicom.dcmread(path), path


@pytest.mark.parametrize(
    "calibrated, meaning", [(True, "Probability of Glaucoma (AI)"), (False, "Model score of Glaucoma (AI)")]
)
def test_the_diagnosis_is_the_first_measurement_of_the_first_group(tmp_path, calibrated, meaning):
    sr, path = _built(tmp_path, Label.GLAUCOMA, label_scores=SCORES, probabilities_calibrated=calibrated)
    assert_valid_sr(path, meaning, "Glaucoma")  # dciodvfy clean; DCMTK renders it
    first_group = _nums(_groups(sr)[0])
    assert first_group[0][1:] == (meaning, 87.0, "%")
    everything = _nums(sr)
    assert len(everything) == 38 and [n[1] for n in everything].count(meaning) == 1  # 37 biomarkers + the score


def test_indeterminate_shows_the_highest_score_and_names_no_label(tmp_path):
    sr, path = _built(tmp_path, Label.INDETERMINATE, label_scores=SCORES, probabilities_calibrated=True)
    assert_valid_sr(path, "Indeterminate (AI): highest label probability")
    code, meaning, value, unit = _nums(_groups(sr)[0])[0]
    assert (meaning, value, unit) == ("Indeterminate (AI): highest label probability", 87.0, "%")
    assert "Glaucoma" not in meaning


def test_an_ungradable_eye_shows_no_diagnosis_score(tmp_path):
    sr, path = _built(
        tmp_path, Label.INDETERMINATE, label_scores=SCORES, narrative="", gradability=Gradability.UNGRADABLE
    )
    assert_valid_sr(path)
    assert not [n for n in _nums(sr) if n[0].startswith("GROK-DX")], _nums(sr)


def test_without_scores_there_is_no_score_item(tmp_path):
    sr, _ = _built(tmp_path, Label.GLAUCOMA)  # label_scores={}: the engine computed none
    assert len(_nums(sr)) == 37 and not [n for n in _nums(sr) if n[0].startswith("GROK-DX")]


@pytest.mark.parametrize("score", [1.5, -0.1, float("nan")])
def test_a_score_that_is_not_a_probability_fails_loudly(tmp_path, score):
    with pytest.raises(SRBuildError, match="not a probability"):
        _built(tmp_path, Label.GLAUCOMA, label_scores={"Glaucoma": score})


def test_findings_whose_label_is_below_the_operating_point_state_no_diagnosis(tmp_path):
    """The validated findings are shipped, the SR's diagnosis is Indeterminate, and a note says which label the
    findings concluded and why it is not stated; dciodvfy clean."""
    low = {"Glaucoma": 0.26, "AMD": 0.2, "Normal": 0.18}
    sr, path = _built(
        tmp_path,
        Label.INDETERMINATE,
        label_scores=low,
        probabilities_calibrated=True,
        operating_point=0.5,
        unsupported_label=Label.GLAUCOMA,
    )
    assert_valid_sr(path, "The findings conclude Glaucoma", "below the operating point 0.50")
    assert "Glaucoma (AI)" not in {n[1] for n in _nums(sr)}  # no probability item names the unstated label
