"""The DICOM Structured Report of one eye's analysis: highdicom TID 1500 in a Comprehensive SR.

One SR per (study, study version, bundle version, eye) — the idempotency key — whose SOP Instance UID is
derived from that key, so a re-run rebuilds the same UID and replaces the earlier copy instead of adding
one. Inputs are validated before anything is built: a wrong eye, a foreign study, an unknown biomarker or
a non-finite value raise `SRBuildError` naming the problem, never a half-valid SR.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from grok_pacs.analysis.result import DECIDER_CLASSIFIER, REASON_TEXT, Gradability, Report
from grok_pacs.dicom.sop_classes import OPT
from grok_pacs.domain.biomarkers import BY_KEY
from grok_pacs.domain.labels import Label
from grok_pacs.report import codes, safety
from grok_pacs.report.keys import _UID_NAMESPACE, SRKey, derived_uid
from grok_pacs.report.sr_groups import EYE_NAMES, eye_groups
from grok_pacs.report.study import TYPE2_PATIENT_STUDY

MANUFACTURER = "grok-pacs"
SR_SERIES_DESCRIPTION = "GROK AI report - UNVERIFIED"
AI_STATEMENT = (
    "This report was generated automatically by an artificial intelligence system (GROK). "
    "It is preliminary and unverified, and must be reviewed by a clinician before any clinical use."
)
NARRATIVE_WITHHELD = (
    "Findings text withheld: the model's generated narrative failed automatic validation "
    "and is not shown as findings (see the comment below)."
)
POINT_STATEMENT = (
    "The point drawn on each image marks the image (for OCT, the B-scan) the measurements were read from; "
    "on the fundus photograph it is placed at the image centre and is not a detected anatomical location."
)
OCT_POINT = {
    True: "On the OCT B-scan the point marks the foveal pit found in it.",
    False: "On the OCT B-scan the point is the image centre (no foveal pit was found), not a detected location.",
}
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")


class SRBuildError(ValueError):
    """The inputs cannot make a correct SR; the message names what is wrong."""


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
    _check_report_key(report, key)
    _check_sources(report, sources, key)
    _check_values(report, key)


def _check_report_key(report: Report, key: SRKey) -> None:
    if not isinstance(report.label, Label):
        raise SRBuildError(f"{key}: label {report.label!r} is not a grok_pacs.domain.labels.Label")
    if report.eye is not key.eye:
        raise SRBuildError(f"{key}: report is for eye {report.eye.value}, key for eye {key.eye.value}")
    if report.bundle_version != key.bundle_version:
        raise SRBuildError(f"{key}: report bundle version {report.bundle_version!r} differs from the key's")


def _check_sources(report: Report, sources: Sequence[Dataset], key: SRKey) -> None:
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
        if not (ds.get("Rows") and ds.get("Columns")):
            raise SRBuildError(f"{key}: source {ds.SOPInstanceUID} has no Rows/Columns (the SR points into it)")


def _check_values(report: Report, key: SRKey) -> None:
    for name, score in report.label_scores.items():
        if not (math.isfinite(score) and 0.0 <= score <= 1.0):
            raise SRBuildError(f"{key}: label score {name}={score} is not a probability in [0, 1]")
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


def decider_note(report: Report) -> str:
    """Which component decided the label and which wrote the findings (grok_pacs.analysis.result)."""
    if report.decided_by == DECIDER_CLASSIFIER:
        return "Label decided by a classifier on the biomarker estimates; findings written by the language model."
    return "Label decided and findings written by the language model."


def _notes(report: Report) -> list[str]:
    notes = [decider_note(report)] if report.gradability is Gradability.GRADABLE else []
    left_out = {q.modality for q in report.left_out}
    missing = [m for m in report.missing_modalities if m not in left_out]
    if missing:
        notes.append(
            f"Not available for this eye: {', '.join(missing)}"
            + (
                "; the assessment used the remaining modality only."
                if report.diagnosed or report.gradability is Gradability.GRADABLE
                else "."
            )
        )
    if report.oct_frame_index is not None:
        notes.append(
            f"OCT B-scan used: frame {report.oct_frame_index + 1} ({report.oct_frame_method or 'unknown'} selection)."
        )
    if report.narrative_withheld:
        reasons = report.narrative_check.reasons
        source = (
            (
                "the diagnosis is the decision classifier's"
                if report.decided_by == DECIDER_CLASSIFIER
                else "the diagnosis is the model's best-scored label"
            )
            if report.label is not Label.INDETERMINATE
            else "no scored label reached the threshold, so the diagnosis is Indeterminate"
        )
        notes.append(
            f"Narrative validation failed ({', '.join(r.value for r in reasons)}): "
            f"{'; '.join(REASON_TEXT[r] for r in reasons)}. The measurements are unaffected; {source}."
        )
    if report.first_attempt is not None and not report.narrative_withheld:
        notes.append(
            "The findings are the language model's second attempt: its first failed validation "
            f"({', '.join(r.value for r in report.first_attempt.reasons)}) and was not shipped."
        )
    if report.unsupported_label is not None and report.decided_by == DECIDER_CLASSIFIER:
        notes.append(f"{report.impression} Review the images and the measurements.")
    elif report.unsupported_label is not None:
        notes.append(
            f"The findings conclude {report.unsupported_label.value}, but that label's calibrated probability "
            f"{report.label_scores.get(report.unsupported_label.value, 0.0):.2f} is below the operating point "
            f"{report.operating_point:.2f}: no diagnosis is stated. Review the images and the measurements."
        )
    if report.numbers_rewritten:
        notes.append(
            f"{report.numbers_rewritten} value(s) cited in the findings were written as the measurements "
            "of this report, which the model's text had misquoted."
        )
    return notes + safety.notes(report)


def _check_pit(pit: tuple[float, float] | None, sources: Sequence[Dataset], key: SRKey) -> None:
    if pit is None:
        return
    oct_header = next((ds for ds in sources if str(ds.SOPClassUID) == OPT), None)
    if oct_header is None:
        raise SRBuildError(f"{key}: a foveal pit was given but the report used no OCT")
    if not (0 <= pit[0] <= float(oct_header.Columns) and 0 <= pit[1] <= float(oct_header.Rows)):
        raise SRBuildError(f"{key}: foveal pit {pit} lies outside the {oct_header.Columns}x{oct_header.Rows} B-scan")


def _text_container(report: Report, pit_found: bool = False) -> hd.sr.ContainerContentItem:
    """TID 1500 'Qualitative Evaluations' container: narrative, impression, AI statement as TEXT."""

    def text(code: codes.Code, value: str) -> hd.sr.TextContentItem:
        return hd.sr.TextContentItem(
            name=_concept(code), value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )

    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    gradable = report.gradability is Gradability.GRADABLE
    items = [
        text(
            codes.FINDING,
            NARRATIVE_WITHHELD
            if report.narrative_withheld
            else report.narrative.strip()
            or ("The model produced no findings text." if gradable else safety.NOT_ANALYSED),
        ),
        text(codes.IMPRESSION, report.impression.strip() or f"{report.label.value}."),
        text(codes.COMMENT, AI_STATEMENT),
        text(codes.COMMENT, POINT_STATEMENT),
        *([text(codes.COMMENT, OCT_POINT[pit_found])] if any(s.sop_class_uid == OPT for s in report.sources) else []),
        *(text(codes.COMMENT, note) for note in _notes(report)),
    ]
    patient = safety.patient_item(report)
    container.ContentSequence = hd.sr.ContentSequence(items + ([patient] if patient is not None else []))
    return container


def _separate_containers(item: Dataset) -> None:
    """Every CONTAINER SEPARATE: text viewers (OHIF's, DCMTK's) then print each child as "name: value"
    instead of running the values of a CONTINUOUS container together."""
    if item.get("ValueType") == "CONTAINER":
        item.ContinuityOfContent = "SEPARATE"
    for child in item.get("ContentSequence", []):
        _separate_containers(child)


def _evidence(sources: Sequence[Dataset]) -> list[Dataset]:
    """Copies of the sources without pixels, Type 2 patient/study attributes present (maybe empty)."""
    out = []
    for ds in sources:
        item = copy.copy(ds)
        for name in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if name in item:
                del item[name]
        for name in TYPE2_PATIENT_STUDY:
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


def build_sr(
    report: Report,
    sources: Sequence[Dataset],
    key: SRKey,
    *,
    oct_pit: tuple[float, float] | None = None,
    previous_versions: Sequence[Dataset] = (),
) -> hd.sr.ComprehensiveSR:
    """The SR of one eye: TID 1500 report, AI device observer, UNVERIFIED / PRELIMINARY. `oct_pit` is the
    (column, row) of the foveal pit in the OCT B-scan used, where the OCT group's point goes.
    `previous_versions`: the earlier SRs this one replaces (a later study version's result), named in its
    Predecessor Documents Sequence (each with its Study, Series, SOP Class and SOP Instance UIDs)."""
    validate(report, sources, key)
    _check_pit(oct_pit, sources, key)
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"GROK {report.bundle_name}", version=report.bundle_version, manufacturer=MANUFACTURER
    )
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
        imaging_measurements=eye_groups(
            report, key, {str(ds.SOPInstanceUID): ds for ds in sources}, algorithm, oct_pit
        ),
    )
    content[0].ContentSequence.append(_text_container(report, oct_pit is not None))
    _separate_containers(content[0])
    sr = hd.sr.ComprehensiveSR(
        evidence=_evidence(sources),
        content=content[0],
        series_instance_uid=key.series_uid,
        series_number=key.series_number,
        sop_instance_uid=key.sop_instance_uid,
        instance_number=key.instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[_equipment(report)],
        series_description=f"{SR_SERIES_DESCRIPTION} ({EYE_NAMES[key.eye].lower()})",
        previous_versions=list(previous_versions) or None,
    )
    # Without SeriesDate, Orthanc Explorer files the series under "?".
    sr.SeriesDate, sr.SeriesTime = sr.ContentDate, sr.ContentTime
    scheme = Dataset()
    scheme.CodingSchemeDesignator = codes.GROK
    scheme.CodingSchemeName = codes.GROK_SCHEME_NAME
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr
