"""The PDF report as a DICOM Encapsulated PDF (SOP class 1.2.840.10008.5.1.4.1.1.104.1) in the same study.

The IHE Eye Care Displayable Report profile uses this IOD: viewers that show no SR content (many PACS
viewers) show the PDF. Its SOP Instance UID comes from the study's `ReportKey` (same study, version and
bundle version as the SRs), so a re-run rebuilds the same instance; it sits in its own series.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from grok_pacs.analysis.result import SourceImage
from grok_pacs.report import codes
from grok_pacs.report.keys import ReportKey
from grok_pacs.report.study import TYPE2_PATIENT_STUDY

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
DOCUMENT_TITLE = "GROK retinal AI report - UNVERIFIED"
SERIES_DESCRIPTION = "GROK AI report (PDF) - UNVERIFIED"
MANUFACTURER = "grok-pacs"
#: Patient and study attributes copied from the study's images (Type 2: present, maybe empty).
_COPIED = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
    "IssuerOfPatientID",
)
_TYPE2 = set(TYPE2_PATIENT_STUDY)


def _code(code: codes.Code) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme, code.meaning
    return item


def _source_sequence(sources: Sequence[SourceImage]) -> list[Dataset]:
    """Source Instance Sequence: the images whose pixels and results the document shows."""
    items = []
    for src in sources:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = src.sop_class_uid, src.sop_instance_uid
        items.append(item)
    return items


def predecessor_sequence(predecessors: Sequence[Dataset]) -> list[Dataset]:
    """Predecessor Documents Sequence (Hierarchical SOP Instance Reference Macro): the earlier documents
    this one replaces, by study and series (each dataset with its Study, Series, SOP Class and Instance UIDs)."""
    studies: dict[str, dict[str, list[Dataset]]] = {}
    for ds in predecessors:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        studies.setdefault(str(ds.StudyInstanceUID), {}).setdefault(str(ds.SeriesInstanceUID), []).append(ref)
    items = []
    for study_uid, series in studies.items():
        item = Dataset()
        item.StudyInstanceUID = study_uid
        item.ReferencedSeriesSequence = []
        for series_uid, refs in series.items():
            series_item = Dataset()
            series_item.SeriesInstanceUID, series_item.ReferencedSOPSequence = series_uid, refs
            item.ReferencedSeriesSequence.append(series_item)
        items.append(item)
    return items


def build_encapsulated_pdf(
    pdf: bytes,
    study: Dataset,
    sources: Sequence[SourceImage],
    key: ReportKey,
    *,
    software_version: str,
    now: datetime | None = None,
    predecessors: Sequence[Dataset] = (),
) -> Dataset:
    """The Encapsulated PDF dataset (with file meta) of `pdf` for the study `study` (any image header of it).
    `predecessors`: the earlier PDF reports this one replaces (a later study version's), set by hand as
    the Predecessor Documents Sequence (highdicom builds only SRs)."""
    if not pdf.startswith(b"%PDF-"):
        raise ValueError(f"{key}: the document is not a PDF")
    if str(study.StudyInstanceUID) != key.study_uid:
        raise ValueError(f"{key}: header of study {study.StudyInstanceUID} given")
    if not sources:
        raise ValueError(f"{key}: a report must reference the images it was made from")
    now = now or datetime.now()
    ds = Dataset()
    for name in _COPIED:
        if name in study:
            setattr(ds, name, study.get(name))
        elif name in _TYPE2:
            setattr(ds, name, None)
    ds.SOPClassUID, ds.SOPInstanceUID = ENCAPSULATED_PDF, key.sop_instance_uid
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "DOC", key.series_uid, key.series_number
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.Manufacturer, ds.SoftwareVersions = MANUFACTURER, software_version
    ds.ConversionType = "WSD"  # SC Equipment: made on a workstation
    ds.InstanceNumber = 1
    ds.BurnedInAnnotation = "YES"  # the document prints the patient's name and ID
    ds.DocumentTitle = DOCUMENT_TITLE
    ds.ConceptNameCodeSequence = [_code(codes.AI_REPORT_DOCUMENT)]
    ds.VerificationFlag = "UNVERIFIED"
    ds.SourceInstanceSequence = _source_sequence(sources)
    if predecessors:
        ds.PredecessorDocumentsSequence = predecessor_sequence(predecessors)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")  # OB values have even length
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ENCAPSULATED_PDF, key.sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds
