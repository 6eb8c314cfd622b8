"""The IOCM rejection note: a Key Object Selection Document that dciodvfy accepts, titled by the reason,
referencing exactly the withdrawn instances, with a UID that depends on its key only; wrong targets refused."""

from __future__ import annotations

import pydicom
import pytest

from grok_pacs.report.rejection import (
    COMPREHENSIVE_SR,
    ENCAPSULATED_PDF,
    RejectionNoteError,
    RejectionReason,
    build_rejection_note,
    reference,
    rejection_uid,
)
from tests.helpers.srcheck import dciodvfy_errors


def _header(study: str = "1.2.826.0.1.3680043.8.498.1") -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.StudyInstanceUID, ds.PatientName, ds.PatientID = study, "Test^Retina", "GROK-TEST-001"
    ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "19600101", "F", "20250101", "101500"
    return ds


def _targets(header: pydicom.Dataset) -> list[pydicom.Dataset]:
    return [
        reference(header, sop_class_uid=COMPREHENSIVE_SR, series_uid="2.25.11", sop_instance_uid="2.25.111"),
        reference(header, sop_class_uid=COMPREHENSIVE_SR, series_uid="2.25.12", sop_instance_uid="2.25.121"),
        reference(header, sop_class_uid=ENCAPSULATED_PDF, series_uid="2.25.13", sop_instance_uid="2.25.131"),
    ]


@pytest.mark.parametrize(
    "reason, meaning",
    [
        (RejectionReason.QUALITY, "Rejected for Quality Reasons"),
        (RejectionReason.SAFETY, "Rejected for Patient Safety Reasons"),
        (RejectionReason.RETENTION, "Data Retention Policy Expired"),
    ],
)
def test_each_reason_makes_a_valid_note_with_its_title(tmp_path, reason, meaning) -> None:
    note = build_rejection_note(_targets(_header()), reason, "k1", description="withdrawn by a test")
    path = tmp_path / "note.dcm"
    note.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    read = pydicom.dcmread(path)
    title = read.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (reason.value, "DCM", meaning)
    assert (read.Modality, read.SOPInstanceUID, read.PatientID) == ("KO", rejection_uid("k1"), "GROK-TEST-001")
    referenced = {
        ref.ReferencedSOPInstanceUID
        for series in read.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert referenced == {"2.25.111", "2.25.121", "2.25.131"}


def test_the_uid_depends_on_the_key_only() -> None:
    first = build_rejection_note(_targets(_header()), RejectionReason.QUALITY, "k1")
    again = build_rejection_note(_targets(_header()), RejectionReason.QUALITY, "k1")
    other = build_rejection_note(_targets(_header()), RejectionReason.QUALITY, "k2")
    assert first.SOPInstanceUID == again.SOPInstanceUID != other.SOPInstanceUID
    assert first.SeriesInstanceUID == again.SeriesInstanceUID != other.SeriesInstanceUID


def test_targets_that_cannot_make_a_note_are_refused() -> None:
    header = _header()
    with pytest.raises(RejectionNoteError, match="at least one"):
        build_rejection_note([], RejectionReason.QUALITY, "k")
    foreign = reference(
        _header("1.2.3.4"), sop_class_uid=COMPREHENSIVE_SR, series_uid="2.25.9", sop_instance_uid="2.25.91"
    )
    with pytest.raises(RejectionNoteError, match="one study, not 2"):
        build_rejection_note([*_targets(header), foreign], RejectionReason.QUALITY, "k")
    with pytest.raises(RejectionNoteError, match="twice"):
        build_rejection_note(_targets(header) + _targets(header)[:1], RejectionReason.QUALITY, "k")
    nameless = _targets(header)[0]
    del nameless.SeriesInstanceUID
    with pytest.raises(RejectionNoteError, match="lacks SeriesInstanceUID"):
        build_rejection_note([nameless], RejectionReason.QUALITY, "k")
    with pytest.raises(RejectionNoteError, match="key"):
        build_rejection_note(_targets(header), RejectionReason.QUALITY, "")
