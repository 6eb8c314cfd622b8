"""The SR's safety content: gradability and its coded reasons, the eye's and the patient's disposition, the
label probabilities and their operating point (codes: grok_pacs.report.codes, private 99GROK where no
SNOMED CT / DICOM code fits)."""

from __future__ import annotations

import highdicom as hd
from highdicom.sr import CodedConcept

from grok_pacs.analysis.result import Disposition, Gradability, Report
from grok_pacs.report import codes

NOT_ANALYSED = "No findings: the images of this eye did not pass the image-quality gate and were not analysed."


def _concept(code: codes.Code) -> CodedConcept:
    return CodedConcept(code.value, code.scheme, code.meaning)


def eye_evaluations(report: Report) -> list[hd.sr.QualitativeEvaluation]:
    """Coded per-eye items of the TID 1501 group: gradability, each gate reason, the eye's recommendation."""
    items = [
        hd.sr.QualitativeEvaluation(
            _concept(codes.GRADABILITY), _concept(codes.GRADABILITY_CODES[report.gradability.value])
        )
    ]
    seen: set[str] = set()
    for verdict in report.quality:
        for reason in verdict.reasons:
            if reason.code not in seen:
                seen.add(reason.code)
                items.append(
                    hd.sr.QualitativeEvaluation(
                        _concept(codes.QUALITY_REASON), _concept(codes.quality_reason_code(reason.code))
                    )
                )
    if report.disposition is not None:
        items.append(
            hd.sr.QualitativeEvaluation(
                _concept(codes.RECOMMENDATION), _concept(codes.ACTION_CODES[report.disposition.action.value])
            )
        )
    return items


def patient_item(report: Report) -> hd.sr.CodeContentItem | None:
    """The patient-level recommendation (roll-up over the eyes) as one coded item, when there is one."""
    if report.patient_disposition is None:
        return None
    return hd.sr.CodeContentItem(
        name=_concept(codes.PATIENT_RECOMMENDATION),
        value=_concept(codes.ACTION_CODES[report.patient_disposition.action.value]),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _disposition_text(d: Disposition) -> str:
    interval = f" (in {d.rescreen_months} months)" if d.rescreen_months else ""
    return f"{d.text}{interval}. Rule {d.rule}; source: {d.source}."


def notes(report: Report) -> list[str]:
    """Plain-text comments: what the gate left out and why, dispositions with sources, probabilities."""
    out = []
    for verdict in report.quality:
        if verdict.gradability is not Gradability.GRADABLE:
            used = (
                "no diagnosis was made"
                if report.gradability is not Gradability.GRADABLE
                else "it was left out and the assessment used the remaining modality only"
            )
            out.append(
                f"Image quality: {verdict.modality} ({verdict.sop_instance_uid}) is "
                f"{verdict.gradability.value}: {'; '.join(r.detail for r in verdict.reasons)}; {used}."
            )
    if report.disposition is not None:
        out.append(f"Recommendation for this eye: {_disposition_text(report.disposition)}")
    if report.patient_disposition is not None:
        p = report.patient_disposition
        systemic = f" Systemic findings (once per patient): {', '.join(p.systemic)}." if p.systemic else ""
        out.append(
            f"Patient-level recommendation (worse eye decides; eye(s) {', '.join(p.eyes)}): "
            f"{_disposition_text(p)}{systemic}"
        )
    if report.label_scores and report.gradability is Gradability.GRADABLE:
        kind = "calibrated" if report.probabilities_calibrated else "uncalibrated"
        scores = ", ".join(f"{k} {v:.3f}" for k, v in sorted(report.label_scores.items(), key=lambda kv: -kv[1]))
        point = (
            f"; operating point (Indeterminate below) {report.operating_point:.2f}"
            if report.operating_point is not None
            else ""
        )
        out.append(f"Label probabilities ({kind}): {scores}{point}.")
    return out
