"""The clinician-verified SR: a copy of an eye's AI SR that a clinician accepted or corrected on the review page.

What changes from the AI SR (PS3.3 C.17.2, SR Document General Module):
- VerificationFlag VERIFIED and PreliminaryFlag FINAL, with a Verifying Observer (the clinician's name and
  organisation, when they verified);
- the Predecessor Documents Sequence names the AI SR (the verified one replaces it for the reader);
- a new SOP Instance UID and series, derived from (AI SR, outcome, label), so a retried review rebuilds the
  same instance and the outbox sends it once;
- a corrected label replaces the AI's coded diagnosis (a diagnosis item is added where the AI stated none),
  and a text item says who verified it, what they decided and their note.
The AI's measurements and probabilities stay as they were: they are the AI's evidence, labelled (AI).
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage

from grok_pacs.domain.labels import Label
from grok_pacs.report import codes
from grok_pacs.report.keys import _UID_NAMESPACE, derived_uid

VERIFIED_SERIES_NUMBER = 9110
VERIFIED_SERIES_DESCRIPTION = "GROK AI report - VERIFIED by clinician"
REVIEW_COMMENT = codes.Code("121106", "DCM", "Comment")


class VerifiedSRError(ValueError):
    """The AI SR or the review cannot make a verified SR; the message says why."""


@dataclass(frozen=True)
class Verification:
    """Who verified the AI SR and how: `label` is None to accept the AI's diagnosis as stated."""

    clinician: str  #: the clinician's name as the SR shows it (DICOM PN: "Family^Given" or a user name)
    organization: str
    label: Label | None = None
    note: str = ""
    at: dt.datetime | None = None  #: when they verified (default now, UTC)

    def __post_init__(self) -> None:
        if not self.clinician.strip() or len(self.clinician) > 64:
            raise VerifiedSRError("the verifying clinician's name must be 1-64 characters")
        if not self.organization.strip() or len(self.organization) > 64:
            raise VerifiedSRError("the verifying organisation must be 1-64 characters")
        if len(self.note) > 1024:
            raise VerifiedSRError("the review note is longer than 1024 characters")

    @property
    def outcome(self) -> str:
        return "CORRECTED" if self.label is not None else "ACCEPTED"


def verified_uid(ai_sr_uid: str, verification: Verification) -> str:
    """The verified SR's SOP Instance UID: the same AI SR and decision give the same UID on any machine."""
    label = verification.label.value if verification.label is not None else ""
    return derived_uid(_UID_NAMESPACE, "verified", ai_sr_uid, verification.outcome, label)


def build_verified_sr(ai_sr: Dataset, verification: Verification) -> Dataset:
    """The verified copy of `ai_sr` (an eye's AI SR as grok-pacs built it, unverified)."""
    if str(ai_sr.get("SOPClassUID", "")) != ComprehensiveSRStorage or "ContentSequence" not in ai_sr:
        raise VerifiedSRError("the AI result is not a Comprehensive SR with content")
    if ai_sr.get("VerificationFlag") != "UNVERIFIED":
        raise VerifiedSRError(f"SR {ai_sr.SOPInstanceUID} is already {ai_sr.get('VerificationFlag')}")
    at = (verification.at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    sr = _plain(ai_sr)
    uid = verified_uid(str(ai_sr.SOPInstanceUID), verification)
    sr.SOPInstanceUID = uid
    sr.file_meta.MediaStorageSOPInstanceUID = uid
    sr.SeriesInstanceUID = derived_uid(uid, "series")  # own series: OHIF shows the last SR of a series only
    sr.SeriesNumber = VERIFIED_SERIES_NUMBER
    sr.InstanceNumber = 1
    eye = str(ai_sr.get("SeriesDescription", "")).rpartition("(")[2].rstrip(")")
    sr.SeriesDescription = f"{VERIFIED_SERIES_DESCRIPTION} ({eye})" if eye else VERIFIED_SERIES_DESCRIPTION
    date, time = at.strftime("%Y%m%d"), at.strftime("%H%M%S")
    sr.ContentDate, sr.ContentTime = date, time
    sr.SeriesDate, sr.SeriesTime = date, time
    sr.InstanceCreationDate, sr.InstanceCreationTime = date, time
    sr.CompletionFlag, sr.PreliminaryFlag, sr.VerificationFlag = "COMPLETE", "FINAL", "VERIFIED"
    sr.VerifyingObserverSequence = [_observer(verification, at)]
    sr.PredecessorDocumentsSequence = [_reference(ai_sr)]
    if verification.label is not None:
        _set_diagnosis(sr, verification.label)
    sr.ContentSequence.append(_comment(verification))
    return sr


def _plain(ds: Dataset) -> Dataset:
    """A plain pydicom copy (highdicom's SR classes refuse plain content items), through its encoding."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def _observer(verification: Verification, at: dt.datetime) -> Dataset:
    observer = Dataset()
    observer.VerifyingObserverName = verification.clinician.strip()
    observer.VerifyingObserverIdentificationCodeSequence = []  # type 2: the site's staff codes are not known here
    observer.VerifyingOrganization = verification.organization.strip()
    observer.VerificationDateTime = at.strftime("%Y%m%d%H%M%S")
    return observer


def _reference(ai_sr: Dataset) -> Dataset:
    """The AI SR as a Hierarchical SOP Instance Reference (study > series > instance)."""
    instance = Dataset()
    instance.ReferencedSOPClassUID = ai_sr.SOPClassUID
    instance.ReferencedSOPInstanceUID = ai_sr.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = ai_sr.SeriesInstanceUID
    series.ReferencedSOPSequence = [instance]
    study = Dataset()
    study.StudyInstanceUID = ai_sr.StudyInstanceUID
    study.ReferencedSeriesSequence = [series]
    return study


def _code_item(code: codes.Code) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme, code.meaning
    return item


def _diagnosis_items(items) -> list[Dataset]:
    """Every CODE item named Diagnosis in the tree (one per eye's first measurement group)."""
    found = []
    for item in items:
        name = item.get("ConceptNameCodeSequence")
        if item.get("ValueType") == "CODE" and name and name[0].CodeValue == codes.DIAGNOSIS.value:
            found.append(item)
        found += _diagnosis_items(item.get("ContentSequence", []))
    return found


def _set_diagnosis(sr: Dataset, label: Label) -> None:
    found = _diagnosis_items(sr.ContentSequence)
    if not found:  # an ungradable eye: the AI stated no diagnosis, the clinician's goes at the root
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "CODE"
        item.ConceptNameCodeSequence = [_code_item(codes.DIAGNOSIS)]
        sr.ContentSequence.append(item)
        found = [item]
    for item in found:
        item.ConceptCodeSequence = [_code_item(codes.LABEL_CODES[label])]


def _comment(verification: Verification) -> Dataset:
    if verification.label is None:
        decision = "accepted the AI's result as stated"
    else:
        decision = f"corrected the diagnosis to {codes.LABEL_CODES[verification.label].meaning}"
    text = f"Verified by {verification.clinician.strip()} ({verification.organization.strip()}), who {decision}."
    if verification.note.strip():
        text += f" Note: {verification.note.strip()}"
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
    item.ConceptNameCodeSequence = [_code_item(REVIEW_COMMENT)]
    item.TextValue = text
    return item
