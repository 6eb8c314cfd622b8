"""The measurement groups of an eye's SR (TID 1410, one per source image), drawn by OHIF's SR viewport.

Each group has a SCOORD POINT SELECTED FROM its image (the OCT B-scan used, with its frame; the fundus
photograph), finding site Retina + laterality and that image's biomarkers (TID 300 NUMs, UCUM units); the
first also holds the coded diagnosis and the gate's items (`safety`), and its tracking identifier names the
conclusion. OHIF draws neither a coded diagnosis nor a tracking identifier, only a group's first NUMs, so the
first NUM of a gradable eye's first group is the diagnosis' score ("Probability of Glaucoma (AI): 87 %");
an eye that was not gradable gets none, so no diagnosis is ever drawn for it. OHIF takes a group's image and
position only from such a SCOORD: a
group of NUMs without one gives a black viewport (docs/domain.md, Display).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset

from grok_pacs.analysis.result import BiomarkerEstimate, Eye, Gradability, Report, SourceImage
from grok_pacs.dicom.sop_classes import OPT
from grok_pacs.domain.biomarkers import BY_KEY, Modality, format_value
from grok_pacs.domain.labels import Label
from grok_pacs.report import codes, safety
from grok_pacs.report.keys import SRKey, derived_uid

EYE_NAMES = {Eye.RIGHT: "Right eye", Eye.LEFT: "Left eye"}


def _concept(code: codes.Code) -> CodedConcept:
    return CodedConcept(code.value, code.scheme, code.meaning)


def _measurements(estimates: Sequence[BiomarkerEstimate]) -> list[hd.sr.Measurement]:
    return [
        hd.sr.Measurement(
            name=_concept(codes.biomarker_code(est.key)),
            value=float(format_value(BY_KEY[est.key], est.value)),
            unit=_concept(codes.UNIT_CODES[est.unit]),
        )
        for est in estimates
    ]


def diagnosis_score(report: Report) -> float | None:
    """The score (0-1) the diagnosis is shown with: the label's, or for Indeterminate the highest label's.
    None when the eye was not gradable or no scores were computed (then nothing states a diagnosis in OHIF)."""
    if report.gradability is not Gradability.GRADABLE or not report.label_scores:
        return None
    if report.label is Label.INDETERMINATE:
        return max(report.label_scores.values())
    return report.label_scores.get(report.label.value)


def _score_measurement(report: Report) -> list[hd.sr.Measurement]:
    """The diagnosis as a NUM in percent, which is how OHIF's SR viewport shows it (it draws NUMs only)."""
    score = diagnosis_score(report)
    if score is None:
        return []
    code = codes.diagnosis_score_code(report.label, report.probabilities_calibrated)
    return [hd.sr.Measurement(name=_concept(code), value=round(100.0 * score, 1), unit=_concept(codes.PERCENT))]


def _modality(src: SourceImage) -> Modality:
    return Modality.OCT if src.sop_class_uid == OPT else Modality.CFP


def _point(src: SourceImage, header: Dataset, pit: tuple[float, float] | None) -> hd.sr.ImageRegion:
    """A SCOORD POINT SELECTED FROM the image: on the OCT B-scan used, the foveal pit when one was found;
    otherwise (and on the photograph) the image centre, an anchor rather than a detected structure.

    OHIF's SR viewport takes the image and the place to draw a group's labels only from such a SCOORD;
    a group of NUMs without one leaves it black.
    """
    if _modality(src) is Modality.OCT and pit is not None:
        centre = np.array([[pit[0], pit[1]]])
    else:
        centre = np.array([[float(header.Columns) / 2.0, float(header.Rows) / 2.0]])
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=centre,
        source_image=hd.sr.SourceImageForRegion(
            src.sop_class_uid, src.sop_instance_uid, [src.frame] if src.frame is not None else None
        ),
    )


def _image_name(report: Report, src: SourceImage) -> str:
    if _modality(src) is Modality.OCT:
        return f"OCT B-scan {src.frame}" if src.frame is not None else "OCT"
    return "fundus photograph"


def _diagnosis(report: Report) -> list[hd.sr.QualitativeEvaluation]:
    """The coded diagnosis (only for an eye that passed the gate), then gradability, reasons, disposition."""
    gradable = report.gradability is Gradability.GRADABLE
    return (
        [hd.sr.QualitativeEvaluation(_concept(codes.DIAGNOSIS), _concept(codes.LABEL_CODES[report.label]))]
        if gradable
        else []
    ) + safety.eye_evaluations(report)


def _conclusion(report: Report) -> str:
    if report.gradability is not Gradability.GRADABLE:
        return codes.GRADABILITY_CODES[report.gradability.value].meaning.split(":")[0].lower()
    return codes.LABEL_CODES[report.label].meaning


def eye_groups(
    report: Report,
    key: SRKey,
    headers: dict[str, Dataset],
    algorithm: hd.sr.AlgorithmIdentification,
    pit: tuple[float, float] | None,
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """TID 1410 groups, one per source image (OCT first): its point, finding site, its biomarkers.

    The first group also carries the coded diagnosis, its score as the group's first NUM (what OHIF draws)
    and a tracking identifier that names it. Biomarkers of a modality without an image stay in the first.
    """
    sources = sorted(report.sources, key=lambda s: _modality(s) is not Modality.OCT)
    by_modality = {_modality(s): [] for s in sources}
    first = _modality(sources[0])
    for est in report.biomarkers:
        by_modality.get(BY_KEY[est.key].modality, by_modality[first]).append(est)
    groups = []
    for index, src in enumerate(sources):
        estimates = by_modality.pop(_modality(src), [])
        title = (
            f"{EYE_NAMES[key.eye]} retina: {_conclusion(report)} (AI, unverified)"
            if index == 0
            else f"{EYE_NAMES[key.eye]} retina, {_image_name(report, src)}"
        )
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derived_uid(*key._parts(), "group", src.sop_instance_uid), identifier=title
                ),
                referenced_region=_point(src, headers[src.sop_instance_uid], pit),
                algorithm_id=algorithm,
                finding_sites=[
                    hd.sr.FindingSite(_concept(codes.RETINA), _concept(codes.LATERALITY_CODES[key.eye.value]))
                ],
                measurements=((_score_measurement(report) if index == 0 else []) + _measurements(estimates)) or None,
                qualitative_evaluations=_diagnosis(report) if index == 0 else None,
            )
        )
    return groups
