"""The clinician-verified SR: a valid Comprehensive SR (dciodvfy), VERIFIED by the named clinician, replacing
the AI SR (Predecessor Documents), with the corrected label as its diagnosis; same review, same UID."""

from __future__ import annotations

import datetime as dt

import pytest

from grok_pacs.analysis.result import Eye
from grok_pacs.domain.labels import Label
from grok_pacs.report import codes
from grok_pacs.report.sr import SRKey, build_sr
from grok_pacs.report.verified import Verification, VerifiedSRError, build_verified_sr, verified_uid
from tests.helpers.ophthalmic_dicom import Patient, make_cfp, make_oct
from tests.helpers.srcheck import assert_valid_sr
from tests.report.test_sr import _report, _save, _source

AT = dt.datetime(2026, 12, 7, 9, 30, tzinfo=dt.UTC)


def _diagnoses(items) -> list[str]:
    found = []
    for item in items:
        name = item.get("ConceptNameCodeSequence")
        if item.get("ValueType") == "CODE" and name and name[0].CodeMeaning == "Diagnosis":
            found.append(item.ConceptCodeSequence[0].CodeMeaning)
        found += _diagnoses(item.get("ContentSequence", []))
    return found


@pytest.fixture
def ai_sr():
    patient = Patient()
    cfp, oct_ds = make_cfp(patient, "R"), make_oct(patient, "R")
    key = SRKey(patient.study_uid, 1, "0.1.0", Eye.RIGHT)
    report = _report(Eye.RIGHT, Label.GLAUCOMA, [_source(cfp), _source(oct_ds, frame=4)])
    return build_sr(report, [cfp, oct_ds], key)


def test_accepted_sr_is_verified_by_the_clinician_and_replaces_the_ai_sr(ai_sr, tmp_path):
    sr = build_verified_sr(ai_sr, Verification("Grey^Meredith", "Eye Clinic North", at=AT))
    path = _save(sr, tmp_path, "verified.dcm")
    text = assert_valid_sr(path, "Verified by Grey^Meredith (Eye Clinic North), who accepted")
    assert "VERIFIED" in text
    assert sr.VerificationFlag == "VERIFIED" and sr.PreliminaryFlag == "FINAL"
    observer = sr.VerifyingObserverSequence[0]
    assert (str(observer.VerifyingObserverName), observer.VerifyingOrganization) == (
        "Grey^Meredith",
        "Eye Clinic North",
    )
    assert observer.VerificationDateTime == "20261207093000"
    predecessor = sr.PredecessorDocumentsSequence[0]
    assert predecessor.StudyInstanceUID == ai_sr.StudyInstanceUID
    ref = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == ai_sr.SOPInstanceUID
    assert sr.SOPInstanceUID != ai_sr.SOPInstanceUID and sr.SeriesInstanceUID != ai_sr.SeriesInstanceUID
    assert _diagnoses(sr.ContentSequence) == [codes.LABEL_CODES[Label.GLAUCOMA].meaning]
    assert ai_sr.VerificationFlag == "UNVERIFIED"  # the AI SR itself is left as it was


def test_corrected_sr_states_the_clinicians_label_and_note(ai_sr, tmp_path):
    review = Verification("Grey^Meredith", "Eye Clinic North", Label.AMD, "drusen in the macula", AT)
    sr = build_verified_sr(ai_sr, review)
    assert_valid_sr(_save(sr, tmp_path, "corrected.dcm"), "corrected the diagnosis to", "drusen in the macula")
    assert _diagnoses(sr.ContentSequence) == [codes.LABEL_CODES[Label.AMD].meaning]
    assert sr.SOPInstanceUID == verified_uid(str(ai_sr.SOPInstanceUID), review)
    assert (
        sr.SOPInstanceUID != build_verified_sr(ai_sr, Verification("Grey^Meredith", "Eye Clinic North")).SOPInstanceUID
    )


def test_a_verified_sr_is_not_verified_again_and_names_are_checked(ai_sr):
    sr = build_verified_sr(ai_sr, Verification("a", "b"))
    with pytest.raises(VerifiedSRError, match="already VERIFIED"):
        build_verified_sr(sr, Verification("a", "b"))
    with pytest.raises(VerifiedSRError, match="organisation"):
        Verification("a", " ")
