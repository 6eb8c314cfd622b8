"""The study's displayable report: one PDF for both eyes, for viewers that do not render SR content.

Made with reportlab; the fonts are TrueType (Bitstream Vera, shipped with reportlab) registered as TTFont,
so they are embedded and the PDF prints the same everywhere. Nothing relies on colour: out-of-range values
are marked in words and bold, so a greyscale print reads the same. The text states what was NOT done (an
ungradable eye, a narrative that failed validation, a missing modality) rather than leaving it out.
`encapsulated.py` wraps the bytes into a DICOM Encapsulated PDF.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import reportlab
from PIL import Image as PILImage
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.platypus import Image, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from grok_pacs.analysis.result import DECIDER_CLASSIFIER, Eye, Gradability, Report
from grok_pacs.dicom.sop_classes import OPT
from grok_pacs.domain.biomarkers import BY_KEY, format_value
from grok_pacs.domain.labels import Label
from grok_pacs.report import codes
from grok_pacs.report.study import StudyHeader

FONT, FONT_BOLD = "GrokVera", "GrokVera-Bold"
BANNER = "UNVERIFIED / PRELIMINARY - AI-generated - to be reviewed by a clinician before any clinical use"
TITLE = "GROK retinal AI report"
EYE_TITLES = {Eye.RIGHT: "Right eye (OD)", Eye.LEFT: "Left eye (OS)"}
UNIT_TEXT = {"um": "\u00b5m", "1": "no unit"}
#: Every table sets its font: reportlab's default cell font is an unembedded Helvetica.
_BASE = [("FONTNAME", (0, 0), (-1, -1), FONT), ("FONTSIZE", (0, 0), (-1, -1), 9)]
THUMB_PX = 480  # longest side of an embedded image: sharp in print at ~80 mm, small file


@dataclass(frozen=True)
class ReportImages:
    """What the PDF shows of one eye: the CFP and the OCT B-scan the report used (uint8 pixels)."""

    cfp: np.ndarray | None = None  #: [H,W,3] or [H,W]
    oct_bscan: np.ndarray | None = None  #: [H,W], the B-scan used
    oct_frames: int | None = None  #: frames in the OCT volume, to say "frame 12 of 25"
    oct_pit: tuple[float, float] | None = None  #: (column, row) of the foveal pit in the B-scan, when found

    def __post_init__(self) -> None:
        for name in ("cfp", "oct_bscan"):
            pixels = getattr(self, name)
            if pixels is not None and (pixels.dtype != np.uint8 or pixels.ndim not in (2, 3)):
                raise ValueError(
                    f"ReportImages.{name}: expected uint8 [H,W] or [H,W,3], got {pixels.dtype} {pixels.shape}"
                )


def _register_fonts() -> None:
    if FONT in pdfmetrics.getRegisteredFontNames():
        return
    fonts = Path(reportlab.__file__).parent / "fonts"
    pdfmetrics.registerFont(TTFont(FONT, str(fonts / "Vera.ttf")))
    pdfmetrics.registerFont(TTFont(FONT_BOLD, str(fonts / "VeraBd.ttf")))


def _styles() -> dict[str, ParagraphStyle]:
    base = ParagraphStyle("body", fontName=FONT, fontSize=9, leading=11.5)
    return {
        "body": base,
        "small": ParagraphStyle("small", parent=base, fontSize=7.5, leading=9),
        "title": ParagraphStyle("title", parent=base, fontName=FONT_BOLD, fontSize=16, leading=20),
        "banner": ParagraphStyle(
            "banner",
            parent=base,
            fontName=FONT_BOLD,
            fontSize=10,
            leading=13,
            borderColor=colors.black,
            borderWidth=1.2,
            borderPadding=5,
            spaceBefore=9,
            spaceAfter=9,
        ),
        "h2": ParagraphStyle("h2", parent=base, fontName=FONT_BOLD, fontSize=12.5, leading=16, spaceBefore=10),
        "h3": ParagraphStyle("h3", parent=base, fontName=FONT_BOLD, fontSize=10, leading=13, spaceBefore=6),
    }


def _p(text: str, style: ParagraphStyle) -> Paragraph:
    return Paragraph(escape(text), style)


def _image(pixels: np.ndarray | None, width_mm: float) -> Image | None:
    if pixels is None:
        return None
    picture = PILImage.fromarray(pixels)
    picture.thumbnail((THUMB_PX, THUMB_PX))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    buffer.seek(0)
    height = width_mm * picture.height / picture.width
    return Image(buffer, width=width_mm * mm, height=height * mm)


def _kv_table(rows: list[tuple[str, str]], styles: dict[str, ParagraphStyle]) -> Table:
    bold = ParagraphStyle("k", parent=styles["body"], fontName=FONT_BOLD)
    table = Table([[_p(k, bold), _p(v, styles["body"])] for k, v in rows], colWidths=[42 * mm, 128 * mm])
    table.setStyle(
        TableStyle(
            [
                *_BASE,
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 1),
                ("TOPPADDING", (0, 0), (-1, -1), 1),
            ]
        )
    )
    return table


def diagnosis_text(report: Report) -> str:
    """The diagnosis line: the label with its probability, or why there is none."""
    if report.gradability is not Gradability.GRADABLE:
        return f"No diagnosis: the images of this eye are {report.gradability.value}."
    meaning = codes.LABEL_CODES[report.label].meaning
    if report.label is Label.INDETERMINATE:
        return f"{meaning}: the model named no diagnosis it could support."
    score = report.label_scores.get(report.label.value)
    if score is None:
        return f"{meaning} (no probability computed)"
    kind = "calibrated probability" if report.probabilities_calibrated else "model score, not calibrated"
    return f"{meaning} ({kind} {score:.2f})"


def decider_text(report: Report) -> str:
    """Which component decided the label and which wrote the findings, in one short sentence."""
    if report.gradability is not Gradability.GRADABLE:
        return "Nothing was decided: the images were not analysed."
    if report.decided_by == DECIDER_CLASSIFIER:
        return "Label decided by the decision classifier; findings written by the language model."
    return "Label and findings by the language model."


def gradability_text(report: Report) -> str:
    parts = [report.gradability.value]
    for quality in report.quality:
        reasons = "; ".join(f"{r.code} ({r.detail})" for r in quality.reasons)
        parts.append(f"{quality.modality}: {quality.gradability.value}" + (f" - {reasons}" if reasons else ""))
    if report.missing_modalities:
        parts.append(f"not received: {', '.join(report.missing_modalities)}")
    return "; ".join(parts)


def disposition_text(disposition) -> str:
    if disposition is None:
        return "Not determined by this system: the clinician decides."
    return f"{disposition.text} [{disposition.action.value}; source: {disposition.source}]"


def _range_flag(key: str, value: float) -> str:
    low, high = BY_KEY[key].normal
    return "LOW *" if value < low else "HIGH *" if value > high else ""


def _biomarker_table(report: Report, styles: dict[str, ParagraphStyle]) -> Table | Paragraph:
    if not report.biomarkers:
        return _p("No biomarkers were estimated for this eye.", styles["body"])
    bold = ParagraphStyle("b", parent=styles["small"], fontName=FONT_BOLD)
    rows = [[_p(h, bold) for h in ("Biomarker", "Value", "Unit", "Normal range", "Flag")]]
    flagged = []
    for est in report.biomarkers:
        marker = BY_KEY[est.key]
        flag = _range_flag(est.key, est.value)
        style = bold if flag else styles["small"]
        low, high = (format_value(marker, v) for v in marker.normal)
        rows.append(
            [
                _p(marker.name, style),
                _p(format_value(marker, est.value), style),
                _p(UNIT_TEXT[est.unit], styles["small"]),
                _p(f"{low} - {high}", styles["small"]),
                _p(flag, bold),
            ]
        )
        if flag:
            flagged.append(len(rows) - 1)
    table = Table(rows, colWidths=[78 * mm, 20 * mm, 18 * mm, 34 * mm, 20 * mm], repeatRows=1)
    commands = [
        ("LINEBELOW", (0, 0), (-1, 0), 0.8, colors.black),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("TOPPADDING", (0, 0), (-1, -1), 0.5),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 0.5),
    ]
    commands += [("BOX", (0, row), (-1, row), 0.6, colors.black) for row in flagged]
    table.setStyle(TableStyle([*_BASE, *commands]))
    return table


def _images_row(report: Report, images: ReportImages, styles: dict[str, ParagraphStyle]) -> Table:
    has_oct = any(s.sop_class_uid == OPT for s in report.sources)
    frame = next((s.frame for s in report.sources if s.sop_class_uid == OPT and s.frame is not None), None)
    of = f" of {images.oct_frames}" if images.oct_frames else ""
    used = (
        f"OCT B-scan used: frame {frame}{of} ({report.oct_frame_method or 'unknown'} selection)"
        if frame is not None
        else "OCT B-scan"
    )
    not_shown = ": image not shown (it did not decode or was not gradable)"
    no_oct = f"{used}{not_shown}" if has_oct else "OCT: not available"
    no_cfp = "Colour fundus photograph" + (
        not_shown if any(s.sop_class_uid != OPT for s in report.sources) else ": not available"
    )
    cells = [
        [
            _image(images.cfp, 80) or _p(no_cfp, styles["body"]),
            _image(images.oct_bscan, 80) or _p(no_oct, styles["body"]),
        ],
        [
            _p("Colour fundus photograph" if images.cfp is not None else "", styles["small"]),
            _p(used if images.oct_bscan is not None else "", styles["small"]),
        ],
    ]
    table = Table(cells, colWidths=[85 * mm, 85 * mm])
    table.setStyle(TableStyle([*_BASE, ("VALIGN", (0, 0), (-1, -1), "TOP")]))
    return table


def narrative_lines(report: Report) -> list[str]:
    """The findings as the PDF prints them, or the statement of why there are none."""
    if report.gradability is not Gradability.GRADABLE:
        return [
            f"No narrative: the images of this eye are {report.gradability.value}, so the language model "
            "was not run. Retake the images, or refer."
        ]
    if report.narrative_withheld:
        return [
            f"The model's findings text failed validation and is not shown "
            f"({report.narrative_check.summary()}). The measurements are unaffected.",
            f"Impression: {report.impression}",
        ]
    lines = [report.narrative.strip() or "The model produced no findings text.", f"Impression: {report.impression}"]
    if report.first_attempt is not None:
        lines.append(
            "(These findings are the model's second attempt: its first text failed validation "
            f"({', '.join(r.value for r in report.first_attempt.reasons)}) and is not shown.)"
        )
    if report.numbers_rewritten:
        lines.append(
            f"{report.numbers_rewritten} value(s) cited in the findings were written as the measured "
            "values of this report, which the model's text had misquoted."
        )
    return lines


def _eye_section(report: Report, images: ReportImages, styles: dict[str, ParagraphStyle]) -> list:
    flow: list = [_p(EYE_TITLES[report.eye], styles["h2"]), _images_row(report, images, styles), Spacer(1, 3 * mm)]
    flow.append(
        _kv_table(
            [
                ("Gradability", gradability_text(report)),
                ("Disposition", disposition_text(report.disposition)),
                ("Diagnosis", diagnosis_text(report)),
            ],
            styles,
        )
    )
    # A sentence, not a fourth row: OCR (and some readers' eyes) take a label column with a wrapped value
    # beside it as one block, parting "Diagnosis" from its label (tests/deploy/test_viewer.py reads it).
    flow.append(_p(decider_text(report), styles["body"]))
    flow.append(_p("Findings (AI narrative)", styles["h3"]))
    flow += [_p(line, styles["body"]) for line in narrative_lines(report)]
    flow.append(_p("Biomarkers (out-of-range values in bold, marked * and boxed)", styles["h3"]))
    flow.append(_biomarker_table(report, styles))
    return flow


def _header(study: StudyHeader, reports: list[Report], styles: dict[str, ParagraphStyle]) -> list:
    first = reports[0]
    rows = [
        ("Patient", f"{study.patient_name} (ID {study.patient_id})"),
        ("Born / sex", f"{study.birth_date or 'unknown'} / {study.sex or 'unknown'}"),
        ("Study", f"{study.study_date or 'date unknown'}, accession {study.accession or 'none'}"),
        ("Study UID", study.study_uid),
        ("AI system", f"GROK {first.bundle_name} {first.bundle_version} ({study.software})"),
        ("Report made", study.made_at),
    ]
    patient = next((r.patient_disposition for r in reports if r.patient_disposition is not None), None)
    return [
        _p(TITLE, styles["title"]),
        _p(BANNER, styles["banner"]),
        _kv_table(rows, styles),
        _p("Patient-level disposition", styles["h2"]),
        _p(disposition_text(patient), styles["body"]),
    ]


def build_pdf(study: StudyHeader, reports: Mapping[Eye, Report], images: Mapping[Eye, ReportImages]) -> bytes:
    """The PDF report of one study: header, patient-level disposition, then each analysed eye."""
    if not reports:
        raise ValueError(f"study {study.study_uid}: a PDF report needs at least one eye's report")
    _register_fonts()
    styles = _styles()
    ordered = [reports[eye] for eye in Eye if eye in reports]
    flow = _header(study, ordered, styles)
    for report in ordered:
        flow += _eye_section(report, images.get(report.eye, ReportImages()), styles)

    def footer(canvas, doc) -> None:
        canvas.saveState()
        canvas.setFont(FONT, 7.5)
        canvas.drawString(15 * mm, 10 * mm, f"{BANNER} | patient ID {study.patient_id} | page {doc.page}")
        canvas.restoreState()

    buffer = io.BytesIO()
    doc = SimpleDocTemplate(
        buffer,
        pagesize=A4,
        leftMargin=15 * mm,
        rightMargin=15 * mm,
        topMargin=14 * mm,
        bottomMargin=16 * mm,
        title=f"{TITLE} - UNVERIFIED",
        author="grok-pacs (AI)",
        subject=f"Study {study.study_uid}",
        invariant=True,
        initialFontName=FONT,
        initialFontSize=9,
    )  # no unembedded Helvetica
    doc.build(flow, onFirstPage=footer, onLaterPages=footer)
    return buffer.getvalue()


def made_at() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M")
