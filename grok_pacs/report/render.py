"""An SR as indented plain text, for a person at a terminal (`grok-pacs report FILE.dcm`), followed by the
path and text of the study's PDF report when one lies beside it (grok-pacs writes both under
`<data>/sr/<study>/`); given an Encapsulated PDF, its header and text.

Walks the content tree with pydicom only (no rendering library), so it prints any SR, not only ours; the
PDF's text is what pypdf extracts (what a reader would copy from the document).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pypdf
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

SR_MODALITY = "SR"
DOC_MODALITY = "DOC"


def _name(item: Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeMeaning) if seq else "(unnamed)"


def _code(seq_item: Dataset) -> str:
    return f"{seq_item.CodeMeaning} ({seq_item.CodeValue}, {seq_item.CodingSchemeDesignator})"


def _value(item: Dataset) -> str:
    """The value of one content item as text, by its value type."""
    kind = str(item.get("ValueType", ""))
    if kind == "TEXT":
        return str(item.TextValue)
    if kind == "CODE":
        return _code(item.ConceptCodeSequence[0])
    if kind == "NUM":
        measured = item.MeasuredValueSequence[0] if item.get("MeasuredValueSequence") else None
        if measured is None:
            return "(no value)"
        unit = measured.MeasurementUnitsCodeSequence[0].CodeValue
        return f"{measured.NumericValue} {unit}" if unit != "1" else str(measured.NumericValue)
    if kind == "UIDREF":
        return str(item.UID)
    if kind in ("IMAGE", "COMPOSITE"):
        ref = item.ReferencedSOPSequence[0]
        frames = ref.get("ReferencedFrameNumber")
        suffix = f" frame {frames}" if frames is not None else ""
        return f"{ref.ReferencedSOPInstanceUID}{suffix}"
    if kind == "SCOORD":
        points = [float(v) for v in item.GraphicData]
        pairs = ", ".join(f"({x:g}, {y:g})" for x, y in zip(points[::2], points[1::2]))
        return f"{item.GraphicType} {pairs}"
    if kind in ("DATETIME", "DATE", "TIME"):
        return str(item.get(kind.capitalize() if kind != "DATETIME" else "DateTime", ""))
    return ""


def content_lines(items: list[Dataset], depth: int = 0) -> Iterator[str]:
    """One line per content item, indented by nesting depth; containers as headings."""
    for item in items:
        pad = "  " * depth
        if item.get("ValueType") == "CONTAINER":
            yield f"{pad}{_name(item)}:"
        else:
            yield f"{pad}{_name(item)}: {_value(item)}"
        if item.get("ContentSequence"):
            yield from content_lines(list(item.ContentSequence), depth + 1)


def header_lines(ds: Dataset) -> Iterator[str]:
    yield f"Document:     {_name(ds)}"
    yield f"SOP Instance: {ds.get('SOPInstanceUID', '')}"
    yield f"Study:        {ds.get('StudyInstanceUID', '')}"
    yield f"Patient ID:   {ds.get('PatientID', '')}"
    yield (
        f"Status:       {ds.get('CompletionFlag', '')} / {ds.get('VerificationFlag', '')} / "
        f"{ds.get('PreliminaryFlag', '')}"
    )
    yield f"Content:      {ds.get('ContentDate', '')} {ds.get('ContentTime', '')}"


def pdf_text(document: bytes) -> str:
    """The text of a PDF document, page by page."""
    reader = pypdf.PdfReader(io.BytesIO(bytes(document)))
    return "\n".join(page.extract_text() for page in reader.pages)


def _pdf_lines(path: Path, ds: Dataset) -> list[str]:
    size = int(ds.get("EncapsulatedDocumentLength") or len(ds.EncapsulatedDocument))
    return [
        f"PDF report:   {path}",
        f"Title:        {ds.get('DocumentTitle', '')}",
        "",
        pdf_text(ds.EncapsulatedDocument[:size]),
    ]


def _companion_pdfs(path: Path, ds: Dataset) -> list[Path]:
    """Encapsulated PDFs of the same study beside the SR (the study's PDF report)."""
    found = []
    for other in sorted(path.parent.glob("*.dcm")):
        if other == path:
            continue
        try:
            head = pydicom.dcmread(other, stop_before_pixels=True, specific_tags=["Modality", "StudyInstanceUID"])
        except (InvalidDicomError, OSError):
            continue  # not a readable DICOM file: not a report of this study
        if head.get("Modality") == DOC_MODALITY and head.get("StudyInstanceUID") == ds.get("StudyInstanceUID"):
            found.append(other)
    return found


def render(path: Path) -> str:
    """The SR at `path` (and the study's PDF beside it), or the Encapsulated PDF at `path`, as text;
    ValueError when the file is neither."""
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError) as exc:
        raise ValueError(f"{path}: not a readable DICOM file ({exc})") from exc
    if ds.get("Modality") == DOC_MODALITY and ds.get("MIMETypeOfEncapsulatedDocument") == "application/pdf":
        return "\n".join([*header_lines(ds), *_pdf_lines(path, ds)]) + "\n"
    if ds.get("Modality") != SR_MODALITY or "ContentSequence" not in ds:
        raise ValueError(f"{path}: not a DICOM Structured Report (Modality {ds.get('Modality')!r})")
    lines = [*header_lines(ds), "", *content_lines(list(ds.ContentSequence))]
    for pdf in _companion_pdfs(path, ds):
        lines += ["", *_pdf_lines(pdf, pydicom.dcmread(pdf))]
    return "\n".join(lines) + "\n"
