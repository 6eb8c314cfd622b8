"""The gradability gate: is this image one the model may read? Decided per eye and modality, before any diagnosis.

Two kinds of checks (thresholds in `QualityThresholds`, from Settings `gate_*`; defaults documented there):
- indication, from the DICOM header: SOP class and Modality agree, laterality R or L, colour CFP
  (3 samples) and grey OCT (MONOCHROME2), 8-16 bit, minimum rows/columns and OCT frame count. A wrong
  class, modality, laterality or photometric interpretation is OUT_OF_SCOPE; too small is UNGRADABLE.
- image quality, from the pixels, at a fixed working size so the measures do not depend on the camera:
  CFP field coverage (fraction of the frame that is lit retina) and field centring, exposure (mean and
  saturated fraction inside the field), contrast (grey-level spread inside the field), sharpness (the
  normalised variance of the Laplacian: std of the Laplacian over std of the image, inside the eroded
  field; blur removes the fine detail first), decoder fill (block rows repeating one tile, what a JPEG
  decoder leaves after corrupted entropy-coded data) and motion blur (isotropy of the fine detail); OCT
  blank and saturated frames, signal strength (99th percentile minus median of the central B-scans, as a
  fraction of full scale) and motion (the retina's axial jump between adjacent B-scans). The measures are
  computed in `quality_measures`.
Pixel data that cannot be decoded is UNGRADABLE with reason `undecodable`, never an exception.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
from pydicom.dataset import Dataset

from grok_pacs.analysis.quality_measures import cfp_measures, oct_measures
from grok_pacs.analysis.result import QUALITY_REASONS as REASONS
from grok_pacs.analysis.result import Eye, Gradability, ModalityQuality, QualityReason, Report, SourceImage
from grok_pacs.config import Settings
from grok_pacs.dicom.sop_classes import LEGACY_SOP_CLASSES, OP_8BIT, OP_16BIT, OPT
from grok_pacs.domain.labels import Label
from grok_pacs.ops import metrics

_OUT_OF_SCOPE = {"sop-class-modality", "laterality", "photometric", "bit-depth"}
_MODALITY_OF_CLASS = {OP_8BIT: ("OP",), OP_16BIT: ("OP",), OPT: ("OPT",)}


@dataclass(frozen=True)
class QualityThresholds:
    """Where the gate draws its lines; `from_settings` reads the `gate_*` Settings fields of the same names."""

    min_cfp_side: int = 224  # px, shorter side of a CFP (the encoder's input side)
    min_oct_rows: int = 64  # px per B-scan, both axes
    min_oct_frames: int = 1  # B-scans per OCT volume
    min_field_coverage: float = 0.25  # fraction of the CFP frame that is lit retina
    max_field_offset: float = 0.25  # distance of the field centroid from the image centre, fraction of the side
    min_exposure: float = 0.08  # mean luminance inside the field, 0..1
    max_exposure: float = 0.92
    max_saturated: float = 0.25  # fraction of field pixels at >= 250 in every channel
    min_contrast: float = 0.015  # std of luminance inside the field, 0..1
    min_sharpness: float = 0.04  # std(Laplacian) / std(image) inside the eroded field
    max_decoder_fill: float = 0.05  # fraction of 16-px block rows that repeat one lit tile across the width
    max_blank_frames: float = 0.5  # fraction of OCT frames with (almost) no signal variation
    max_saturated_frames: float = 0.5  # fraction of OCT frames mostly at full scale
    min_oct_signal: float = 0.15  # (p99 - median) / full scale of the central B-scans
    min_isotropy: float = 0.6  # CFP fine detail, weakest direction / strongest (motion blur: 0.2-0.4)
    max_axial_jump: float = 0.08  # OCT retina depth change between adjacent B-scans, fraction of the height

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"gate_{f.name}: must be >= 0, got {getattr(self, f.name)}")
        if self.min_exposure >= self.max_exposure:
            raise ValueError("gate_min_exposure must be below gate_max_exposure")

    @classmethod
    def from_settings(cls, settings: Settings) -> QualityThresholds:
        return cls(**{f.name: getattr(settings, f"gate_{f.name}") for f in fields(cls)})


def _verdict(
    modality: str, reasons: list[QualityReason], measures: dict[str, float], sop_uid: str | None
) -> ModalityQuality:
    if not reasons:
        return ModalityQuality(modality, Gradability.GRADABLE, (), measures, sop_uid)
    scope = any(r.code in _OUT_OF_SCOPE for r in reasons)
    return ModalityQuality(
        modality, Gradability.OUT_OF_SCOPE if scope else Gradability.UNGRADABLE, tuple(reasons), measures, sop_uid
    )


def _reason(code: str, detail: str) -> QualityReason:
    return QualityReason(code, f"{REASONS[code]}: {detail}")


# --- header ------------------------------------------------------------------------------------------
def check_header(modality: str, ds: Dataset, limits: QualityThresholds) -> list[QualityReason]:
    """Indication checks of one instance's header (no pixels needed)."""
    out: list[QualityReason] = []
    sop, dicom_modality = str(ds.get("SOPClassUID", "")), str(ds.get("Modality", "")).upper()
    allowed = _MODALITY_OF_CLASS.get(sop, ("OP", "XC", "OT") if sop in LEGACY_SOP_CLASSES else ())
    if dicom_modality not in allowed:
        out.append(_reason("sop-class-modality", f"class {sop} with Modality {dicom_modality or 'missing'}"))
    laterality = str(ds.get("ImageLaterality") or ds.get("Laterality") or "").strip().upper()
    if laterality not in ("R", "L"):
        out.append(_reason("laterality", f"{laterality or 'missing'}"))
    photometric, samples = str(ds.get("PhotometricInterpretation", "")), int(ds.get("SamplesPerPixel", 0) or 0)
    if modality == "CFP" and samples != 3:
        out.append(_reason("photometric", f"CFP needs colour (3 samples), got {photometric or 'none'}"))
    if modality == "OCT" and photometric != "MONOCHROME2":
        out.append(_reason("photometric", f"OCT needs MONOCHROME2, got {photometric or 'none'}"))
    allocated, stored = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("BitsStored", 0) or 0)
    if allocated not in (8, 16) or not 8 <= stored <= allocated:
        out.append(_reason("bit-depth", f"BitsAllocated {allocated}, BitsStored {stored}"))
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    least = limits.min_cfp_side if modality == "CFP" else limits.min_oct_rows
    if min(rows, cols) < least:
        out.append(_reason("resolution", f"{rows}x{cols} < {least} px"))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if modality == "OCT" and frames < limits.min_oct_frames:
        out.append(_reason("frames", f"{frames} < {limits.min_oct_frames}"))
    return out


def undecodable(modality: str, error: str, sop_uid: str | None) -> ModalityQuality:
    """The verdict on an image whose pixels cannot be read."""
    return ModalityQuality(modality, Gradability.UNGRADABLE, (_reason("undecodable", error),), {}, sop_uid)


def judge(
    modality: str,
    header: Dataset,
    pixels: np.ndarray | None,
    error: str | None,
    sop_uid: str,
    limits: QualityThresholds,
) -> ModalityQuality:
    """The gate's verdict on one instance: undecodable when `pixels` is None (with `error`), else assessed."""
    if pixels is None:
        verdict = undecodable(modality, error or "no pixel data", sop_uid)
    else:
        verdict = (assess_cfp if modality == "CFP" else assess_oct)(pixels, limits, header, sop_uid)
    metrics.gate_judged(modality, verdict.gradability.value, [r.code for r in verdict.reasons])
    return verdict


def ungradable_report(
    eye: Eye, verdicts: Sequence[ModalityQuality], sources: Sequence[SourceImage], bundle_name: str, bundle_version: str
) -> Report:
    """The report of an eye no modality of which passed the gate: no diagnosis, no narrative, the reasons."""
    if not verdicts or any(v.gradability is Gradability.GRADABLE for v in verdicts):
        raise ValueError(f"eye {eye}: an ungradable report needs verdicts, none of them gradable")
    worst = (
        Gradability.OUT_OF_SCOPE
        if all(v.gradability is Gradability.OUT_OF_SCOPE for v in verdicts)
        else Gradability.UNGRADABLE
    )
    reasons = "; ".join(f"{v.modality}: {', '.join(r.detail for r in v.reasons)}" for v in verdicts)
    return Report(
        eye=Eye(eye),
        label=Label.INDETERMINATE,
        narrative="",
        impression=f"No diagnosis: the images of this eye are {worst.value} ({reasons}).",
        raw_text="",
        biomarkers=(),
        cited_numbers=(),
        label_scores={},
        missing_modalities=tuple(m for m in ("CFP", "OCT") if m not in {v.modality for v in verdicts}),
        sources=tuple(sources),
        oct_frame_index=None,
        oct_frame_method=None,
        bundle_name=bundle_name,
        bundle_version=bundle_version,
        gradability=worst,
        quality=tuple(verdicts),
    )


def assess_cfp(
    rgb: np.ndarray, limits: QualityThresholds, header: Dataset | None = None, sop_uid: str | None = None
) -> ModalityQuality:
    """Verdict on a CFP: header checks (when a header is given), then the pixel measures against `limits`."""
    reasons = check_header("CFP", header, limits) if header is not None else []
    if header is None and min(rgb.shape[:2]) < limits.min_cfp_side:
        reasons.append(_reason("resolution", f"{rgb.shape[0]}x{rgb.shape[1]} < {limits.min_cfp_side} px"))
    m = cfp_measures(rgb)
    checks = (
        (
            "field-coverage",
            m["field_coverage"] < limits.min_field_coverage,
            f"{m['field_coverage']:.2f} < {limits.min_field_coverage}",
        ),
        (
            "off-centre",
            m["field_offset"] > limits.max_field_offset,
            f"{m['field_offset']:.2f} > {limits.max_field_offset}",
        ),
        ("underexposed", m["exposure"] < limits.min_exposure, f"mean {m['exposure']:.2f} < {limits.min_exposure}"),
        (
            "overexposed",
            m["exposure"] > limits.max_exposure or m["saturated"] > limits.max_saturated,
            f"mean {m['exposure']:.2f}, saturated {m['saturated']:.2f}",
        ),
        ("low-contrast", m["contrast"] < limits.min_contrast, f"{m['contrast']:.3f} < {limits.min_contrast}"),
        ("blur", m["sharpness"] < limits.min_sharpness, f"sharpness {m['sharpness']:.3f} < {limits.min_sharpness}"),
        (
            "motion",
            m["isotropy"] < limits.min_isotropy,
            f"motion blur: isotropy {m['isotropy']:.2f} < {limits.min_isotropy}",
        ),
        (
            "decoder-fill",
            m["decoder_fill"] > limits.max_decoder_fill,
            f"{m['decoder_fill']:.2f} of block rows repeat one tile > {limits.max_decoder_fill}",
        ),
    )
    reasons += [_reason(code, detail) for code, failed, detail in checks if failed]
    return _verdict("CFP", reasons, m, sop_uid)


def assess_oct(
    volume: np.ndarray, limits: QualityThresholds, header: Dataset | None = None, sop_uid: str | None = None
) -> ModalityQuality:
    """Verdict on an OCT volume: header checks (when given), then the pixel measures against `limits`."""
    reasons = check_header("OCT", header, limits) if header is not None else []
    if header is None and min(volume.shape[1:]) < limits.min_oct_rows:
        reasons.append(_reason("resolution", f"{volume.shape[1]}x{volume.shape[2]} < {limits.min_oct_rows} px"))
    bits = int(header.get("BitsStored", 8) or 8) if header is not None else (8 if volume.dtype == np.uint8 else 16)
    m = oct_measures(volume, float(2**bits - 1))
    checks = (
        (
            "blank-frames",
            m["blank_frames"] > limits.max_blank_frames or m["central_blank"] > 0,
            f"{m['blank_frames']:.2f} of frames blank (central {'blank' if m['central_blank'] else 'not blank'})",
        ),
        (
            "saturated-frames",
            m["saturated_frames"] > limits.max_saturated_frames,
            f"{m['saturated_frames']:.2f} > {limits.max_saturated_frames}",
        ),
        ("low-signal", m["signal"] < limits.min_oct_signal, f"{m['signal']:.3f} < {limits.min_oct_signal}"),
        (
            "motion",
            # judged on a volume with signal only: in noise the retina's depth is not defined
            m["signal"] >= limits.min_oct_signal and m["axial_jump"] > limits.max_axial_jump,
            f"axial jump {m['axial_jump']:.2f} of the B-scan height > {limits.max_axial_jump}",
        ),
    )
    reasons += [_reason(code, detail) for code, failed, detail in checks if failed]
    return _verdict("OCT", reasons, m, sop_uid)


def quality_margin(verdict: ModalityQuality, limits: QualityThresholds) -> float:
    """The smallest relative margin of the verdict's pixel measures to their thresholds (negative: a check
    failed; -1 when there are no measures, e.g. undecodable). Its negation ranks images by ungradability."""
    m = verdict.measures
    if verdict.modality == "CFP":
        checks = [
            ("field_coverage", limits.min_field_coverage, 1),
            ("field_offset", limits.max_field_offset, -1),
            ("exposure", limits.min_exposure, 1),
            ("exposure", limits.max_exposure, -1),
            ("saturated", limits.max_saturated, -1),
            ("contrast", limits.min_contrast, 1),
            ("sharpness", limits.min_sharpness, 1),
            ("isotropy", limits.min_isotropy, 1),
            ("decoder_fill", limits.max_decoder_fill, -1),
        ]
    else:
        checks = [
            ("blank_frames", limits.max_blank_frames, -1),
            ("saturated_frames", limits.max_saturated_frames, -1),
            ("signal", limits.min_oct_signal, 1),
            ("axial_jump", limits.max_axial_jump, -1),
        ]
    if not m or any(name not in m for name, _, _ in checks):
        return -1.0
    margins = [sign * (m[name] - limit) / max(limit, 1e-6) for name, limit, sign in checks]
    if verdict.modality == "OCT" and m.get("central_blank"):
        margins.append(-1.0)
    return float(min(margins))


def with_learned(verdict: ModalityQuality, probability: float | None, threshold: float) -> ModalityQuality:
    """A gradable verdict made ungradable when the learned head's P(ungradable) reaches `threshold`."""
    if probability is None or verdict.gradability is not Gradability.GRADABLE:
        return verdict
    measures = {**verdict.measures, "learned_ungradable": float(probability)}
    if probability < threshold:
        return ModalityQuality(
            verdict.modality, verdict.gradability, verdict.reasons, measures, verdict.sop_instance_uid
        )
    reason = _reason("learned-quality", f"P(ungradable) {probability:.2f} >= {threshold:.2f}")
    metrics.gate_judged(verdict.modality, Gradability.UNGRADABLE.value, [reason.code])
    return ModalityQuality(verdict.modality, Gradability.UNGRADABLE, (reason,), measures, verdict.sop_instance_uid)
