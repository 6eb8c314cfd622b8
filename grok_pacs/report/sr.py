"""The DICOM Structured Report of one eye's analysis: highdicom TID 1500 in a Comprehensive SR.

One SR per (study, study version, bundle version, eye) — the idempotency key — whose SOP Instance UID is
derived from that key, so a re-run rebuilds the same UID and replaces the earlier copy instead of adding
one. Inputs are validated before anything is built: a wrong eye, a foreign study, an unknown biomarker or
a non-finite value raise `SRBuildError` naming the problem, never a half-valid SR.
"""

from __future__ import annotations

import copy
import math
import uuid
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Sequence

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from grok_pacs.report import codes
from grok_pacs.domain.biomarkers import BY_KEY, format_value
from grok_pacs.domain.labels import Label
from grok_pacs.analysis.result import REASON_TEXT, Eye, Report

MANUFACTURER = "grok-pacs"
SR_SERIES_NUMBER = 9100
SR_SERIES_DESCRIPTION = "GROK AI report - UNVERIFIED"
AI_STATEMENT = (
    "This report was generated automatically by an artificial intelligence system (GROK). "
    "It is preliminary and unverified, and must be reviewed by a clinician before any clinical use."
)
NARRATIVE_WITHHELD = ("Findings text withheld: the model's generated narrative failed automatic validation "
                      "and is not shown as findings (see the comment below).")
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
_UID_NAMESPACE = "grok-pacs/sr/v1"
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:grok-pacs:sr:v1")
_TYPE2_PATIENT_STUDY = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)
EYE_NAMES = {Eye.RIGHT: "Right eye", Eye.LEFT: "Left eye"}


def derived_uid(*parts: str) -> str:
    """A DICOM UID under 2.25 (PS3.5 B.2) from a name-based UUID: same parts, same UID, any machine."""
    return f"2.25.{uuid.uuid5(_UUID_NAMESPACE, chr(31).join(parts)).int}"


class SRBuildError(ValueError):
    """The inputs cannot make a correct SR; the message names what is wrong."""


@dataclass(frozen=True)
class SRKey:
    """The idempotency key of one SR: the same key always gives the same SOP Instance UID."""

    study_uid: str
    study_version: int
    bundle_version: str
    eye: Eye

    def _parts(self) -> list[str]:
        return [_UID_NAMESPACE, self.study_uid, str(self.study_version), self.bundle_version, self.eye.value]

    @property
    def sop_instance_uid(self) -> str:
        return derived_uid(*self._parts())

    @property
    def series_uid(self) -> str:
        """One SR series per analysis run (study version x bundle version); both eyes share it."""
        return derived_uid(*self._parts()[:-1], "series")

    @property
    def instance_number(self) -> int:
        return 1 if self.eye is Eye.RIGHT else 2

    def __str__(self) -> str:
        return f"{self.study_uid} v{self.study_version} bundle {self.bundle_version} eye {self.eye.value}"


def device_uid(bundle_name: str, bundle_version: str) -> str:
    """The AI device's UID: fixed for one model bundle, different for another."""
    return derived_uid(_UID_NAMESPACE, "device", bundle_name, bundle_version)


def _concept(code: codes.Code) -> CodedConcept:
    return CodedConcept(code.value, code.scheme, code.meaning)


def _software_version() -> str:
    try:
        return version("grok-pacs")
    except PackageNotFoundError:
        return "unknown"


def _laterality(ds: Dataset) -> str:
    return str(ds.get("ImageLaterality") or ds.get("Laterality") or "").strip().upper()


def validate(report: Report, sources: Sequence[Dataset], key: SRKey) -> None:
    """Raise SRBuildError unless report, source datasets and key describe one eye of one study."""
    if not isinstance(report.label, Label):
        raise SRBuildError(f"{key}: label {report.label!r} is not a grok_pacs.domain.labels.Label")
    if report.eye is not key.eye:
        raise SRBuildError(f"{key}: report is for eye {report.eye.value}, key for eye {key.eye.value}")
    if report.bundle_version != key.bundle_version:
        raise SRBuildError(f"{key}: report bundle version {report.bundle_version!r} differs from the key's")
    if not sources:
        raise SRBuildError(f"{key}: no source images (an SR must reference what it was computed from)")
    wanted = {s.sop_instance_uid for s in report.sources}
    given = {str(ds.SOPInstanceUID) for ds in sources}
    if wanted != given:
        raise SRBuildError(f"{key}: source datasets {sorted(given)} differ from report sources {sorted(wanted)}")
    for ds in sources:
        if str(ds.StudyInstanceUID) != key.study_uid:
            raise SRBuildError(f"{key}: source {ds.SOPInstanceUID} belongs to study {ds.StudyInstanceUID}")
        if _laterality(ds) != key.eye.value:
            raise SRBuildError(f"{key}: source {ds.SOPInstanceUID} has laterality {_laterality(ds)!r}")
    seen: set[str] = set()
    for estimate in report.biomarkers:
        marker = BY_KEY.get(estimate.key)
        if marker is None:
            raise SRBuildError(f"{key}: unknown biomarker {estimate.key!r}")
        if estimate.unit != marker.unit:
            raise SRBuildError(f"{key}: biomarker {estimate.key} in {estimate.unit!r}, expected {marker.unit!r}")
        if not math.isfinite(estimate.value):
            raise SRBuildError(f"{key}: biomarker {estimate.key} value {estimate.value} is not finite")
        if estimate.key in seen:
            raise SRBuildError(f"{key}: biomarker {estimate.key} given twice")
        seen.add(estimate.key)


def _measurements(report: Report) -> list[hd.sr.Measurement]:
    return [
        hd.sr.Measurement(
            name=_concept(codes.biomarker_code(est.key)),
            value=float(format_value(BY_KEY[est.key], est.value)),
            unit=_concept(codes.UNIT_CODES[est.unit]),
        )
        for est in report.biomarkers
    ]


def _source_refs(report: Report) -> list[hd.sr.SourceImageForMeasurementGroup]:
    return [
        hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=src.sop_class_uid,
            referenced_sop_instance_uid=src.sop_instance_uid,
            referenced_frame_numbers=[src.frame] if src.frame is not None else None,
        )
        for src in report.sources
    ]


def _eye_group(report: Report, key: SRKey, algorithm: hd.sr.AlgorithmIdentification
               ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of one eye: finding site Retina + laterality, biomarkers, coded diagnosis."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(*key._parts(), "group"),
            identifier=f"{EYE_NAMES[key.eye]} retina",
        ),
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(_concept(codes.RETINA), _concept(codes.LATERALITY_CODES[key.eye.value]))],
        measurements=_measurements(report) or None,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(_concept(codes.DIAGNOSIS), _concept(codes.LABEL_CODES[report.label]))
        ],
        source_images=_source_refs(report),
    )


def _notes(report: Report) -> list[str]:
    notes = []
    if report.missing_modalities:
        notes.append(f"Not available for this eye: {', '.join(report.missing_modalities)}; "
                     "the assessment used the remaining modality only.")
    if report.oct_frame_index is not None:
        notes.append(f"OCT B-scan used: frame {report.oct_frame_index + 1} ({report.oct_frame_method or 'unknown'} "
                     "selection).")
    if report.narrative_withheld:
        reasons = report.narrative_check.reasons
        source = ("the diagnosis is the model's best-scored label" if report.label is not Label.INDETERMINATE
                  else "no scored label reached the threshold, so the diagnosis is Indeterminate")
        notes.append(f"Narrative validation failed ({', '.join(r.value for r in reasons)}): "
                     f"{'; '.join(REASON_TEXT[r] for r in reasons)}. The measurements are unaffected; {source}.")
    if report.numbers_rewritten:
        notes.append(f"{report.numbers_rewritten} value(s) cited in the findings were written as the measurements "
                     "of this report, which the model's text had misquoted.")
    return notes


def _text_container(report: Report) -> hd.sr.ContainerContentItem:
    """TID 1500 'Qualitative Evaluations' container: narrative, impression, AI statement as TEXT."""
    def text(code: codes.Code, value: str) -> hd.sr.TextContentItem:
        return hd.sr.TextContentItem(name=_concept(code), value=value,
                                     relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    items = [
        text(codes.FINDING, NARRATIVE_WITHHELD if report.narrative_withheld
             else report.narrative.strip() or "The model produced no findings text."),
        text(codes.IMPRESSION, report.impression.strip() or f"{report.label.value}."),
        text(codes.COMMENT, AI_STATEMENT),
        *(text(codes.COMMENT, note) for note in _notes(report)),
    ]
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _evidence(sources: Sequence[Dataset]) -> list[Dataset]:
    """Copies of the sources without pixels, Type 2 patient/study attributes present (maybe empty)."""
    out = []
    for ds in sources:
        item = copy.copy(ds)
        for name in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if name in item:
                del item[name]
        for name in _TYPE2_PATIENT_STUDY:
            if name not in item:
                setattr(item, name, None)
        out.append(item)
    return out


def _equipment(report: Report) -> hd.ContributingEquipment:
    """Contributing Equipment item of the AI (IHE AI Results): manufacturer, model name, versions.

    The device UID lives in the observer context (TID 1004); Device UID in this sequence is not in the
    IOD dciodvfy knows and would make the SR a Standard Extended SOP Class.
    """
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=_concept(codes.PROCESSING_EQUIPMENT),
        manufacturer_model_name=f"GROK {report.bundle_name}"[:64],
        software_versions=[report.bundle_version, f"grok-pacs {_software_version()}"],
        contribution_description="AI analysis of fundus photographs and OCT (GROK); results unverified",
    )


def build_sr(report: Report, sources: Sequence[Dataset], key: SRKey) -> hd.sr.ComprehensiveSR:
    """The SR of one eye: TID 1500 report, AI device observer, UNVERIFIED / PRELIMINARY."""
    validate(report, sources, key)
    algorithm = hd.sr.AlgorithmIdentification(name=f"GROK {report.bundle_name}", version=report.bundle_version,
                                              manufacturer=MANUFACTURER)
    observer = hd.sr.ObserverContext(
        observer_type=dcm_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(report.bundle_name, report.bundle_version),
            name=f"GROK {report.bundle_name} {report.bundle_version}"[:64],
            manufacturer_name=MANUFACTURER,
            model_name=f"GROK {report.bundle_name}"[:64],
        ),
    )
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_concept(codes.IMAGING_PROCEDURE),
        imaging_measurements=[_eye_group(report, key, algorithm)],
    )
    content[0].ContentSequence.append(_text_container(report))
    sr = hd.sr.ComprehensiveSR(
        evidence=_evidence(sources),
        content=content[0],
        series_instance_uid=key.series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=key.sop_instance_uid,
        instance_number=key.instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[_equipment(report)],
        series_description=SR_SERIES_DESCRIPTION,
    )
    scheme = Dataset()
    scheme.CodingSchemeDesignator = codes.GROK
    scheme.CodingSchemeName = codes.GROK_SCHEME_NAME
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr
