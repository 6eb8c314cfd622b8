"""IHE Imaging Object Change Management (IOCM) rejection notes: a Key Object Selection Document (TID 2010)
whose title says why the objects it references are withdrawn, built with highdicom.

A PACS that implements IOCM (dcm4chee-arc, for one) hides or deletes the referenced instances when it
receives the note; one that does not keeps the note beside them, where a reader sees the title. grok-pacs
sends one when a later study version's results replace earlier ones (quality: the results were made from
an incomplete study), when an administrator withdraws a study's results (`grok-pacs withdraw`), and when
a clinician rejects a result on the review page.

The note's SOP Instance UID is derived from a caller's `key` (the withdrawn results), so a re-run builds
the same instance and the outbox delivers it once; it sits in its own series.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset

from grok_pacs.report.keys import _UID_NAMESPACE, derived_uid
from grok_pacs.report.study import TYPE2_PATIENT_STUDY

MANUFACTURER = "grok-pacs"
REJECTION_SERIES_NUMBER = 9120  # (9100 PDF, 9101/9102 SRs, 9110 clinician-verified SRs)
SERIES_DESCRIPTION = "GROK AI results withdrawn (IOCM rejection note)"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
#: What a reference (a rejected instance, or the header the note copies) must hold.
_IDENTIFYING = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")


class RejectionReason(StrEnum):
    """The note's document title (CID 7011, scheme DCM): why the referenced objects are withdrawn."""

    QUALITY = "113001"  #: Rejected for Quality Reasons (also: replaced by a later study version's results)
    SAFETY = "113037"  #: Rejected for Patient Safety Reasons
    RETENTION = "113039"  #: Data Retention Policy Expired

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_MEANINGS = {
    RejectionReason.QUALITY: "Rejected for Quality Reasons",
    RejectionReason.SAFETY: "Rejected for Patient Safety Reasons",
    RejectionReason.RETENTION: "Data Retention Policy Expired",
}


class RejectionNoteError(ValueError):
    """The targets cannot make a correct rejection note; the message names what is wrong."""


def rejection_uid(key: str) -> str:
    """The note's SOP Instance UID for `key`: the same key gives the same UID on any machine."""
    if not key:
        raise RejectionNoteError("a rejection note needs a non-empty key")
    return derived_uid(_UID_NAMESPACE, "rejection", key)


def reference(header: Dataset, *, sop_class_uid: str, series_uid: str, sop_instance_uid: str) -> Dataset:
    """A target for `build_rejection_note` (or an SR's predecessor) named by its UIDs, with the patient and
    study attributes of `header` (any instance of the study): no need to read the rejected object's file."""
    ds = Dataset()
    for name in ("SpecificCharacterSet", *TYPE2_PATIENT_STUDY):
        if name in header:
            setattr(ds, name, header.get(name))
    ds.StudyInstanceUID = header.StudyInstanceUID
    ds.SeriesInstanceUID, ds.SOPClassUID, ds.SOPInstanceUID = series_uid, sop_class_uid, sop_instance_uid
    return ds


def _check(targets: Sequence[Dataset]) -> None:
    if not targets:
        raise RejectionNoteError("a rejection note must reference at least one instance")
    for ds in targets:
        missing = [name for name in _IDENTIFYING if not ds.get(name)]
        if missing:
            raise RejectionNoteError(f"rejection target {ds.get('SOPInstanceUID', '?')} lacks {', '.join(missing)}")
    studies = {str(ds.StudyInstanceUID) for ds in targets}
    if len(studies) != 1:
        raise RejectionNoteError(f"a rejection note references one study, not {len(studies)}: {sorted(studies)}")
    uids = [str(ds.SOPInstanceUID) for ds in targets]
    if len(set(uids)) != len(uids):
        raise RejectionNoteError(f"rejection targets name an instance twice: {sorted(uids)}")


def _evidence(targets: Sequence[Dataset]) -> list[Dataset]:
    """The targets with their Type 2 patient/study attributes present (the note copies the first's)."""
    out = []
    for ds in targets:
        item = Dataset()
        item.update(ds)
        for name in TYPE2_PATIENT_STUDY:
            if name not in item:
                setattr(item, name, None)
        out.append(item)
    return out


def build_rejection_note(
    targets: Sequence[Dataset], reason: RejectionReason, key: str, *, description: str | None = None
) -> hd.ko.KeyObjectSelectionDocument:
    """The IOCM rejection note withdrawing `targets` (instances of one study; each with its Study, Series,
    SOP Class and SOP Instance UIDs) for `reason`; its SOP Instance UID is `rejection_uid(key)`.
    `description`, when given, is the note's Key Object Description (e.g. what replaced the results)."""
    reason = RejectionReason(reason)
    _check(targets)
    evidence = _evidence(targets)
    uid = rejection_uid(key)
    content = hd.ko.KeyObjectSelection(
        document_title=CodedConcept(reason.value, "DCM", reason.meaning),
        referenced_objects=evidence,
        description=description,
    )
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=evidence,
        content=content,
        series_instance_uid=derived_uid(_UID_NAMESPACE, "rejection", key, "series"),
        series_number=REJECTION_SERIES_NUMBER,
        sop_instance_uid=uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
    )
    note.SeriesDescription = SERIES_DESCRIPTION
    # Without SeriesDate, Orthanc Explorer files the series under "?".
    note.SeriesDate, note.SeriesTime = note.ContentDate, note.ContentTime
    return note
