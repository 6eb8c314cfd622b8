"""The study's PDF report in the per-study job: the PDF of what each eye's report said, with the pictures it
used (`eye_analysis.AnalysedEye`, decoded once), and its DICOM wrapper, written under `<data>/sr/<study>/`
beside the SRs (the outbox delivers it like an SR).

Made only when every analysed eye's report is at hand (all eyes analysed in this run): a study version
whose SRs were made by an earlier run without a PDF (the setting was off, or an older release) keeps its
SRs and gets no PDF rather than a second model run.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pydicom.dataset import Dataset

from grok_pacs.analysis.result import Eye
from grok_pacs.config import Settings
from grok_pacs.delivery.sender import write_result
from grok_pacs.jobs.eye_analysis import AnalysedEye
from grok_pacs.report.encapsulated import build_encapsulated_pdf
from grok_pacs.report.keys import ReportKey
from grok_pacs.report.pdf import build_pdf, made_at
from grok_pacs.report.study import StudyHeader


def software() -> str:
    try:
        return f"grok-pacs {version('grok-pacs')}"
    except PackageNotFoundError:
        return "grok-pacs (version unknown)"


def write_pdf_report(
    settings: Settings, analysed: Sequence[AnalysedEye], key: ReportKey, predecessors: Sequence[Dataset] = ()
) -> str:
    """Build the study's PDF from the analysed eyes (report, evidence headers, the images they used, as
    decoded for planning) and write it; returns its path relative to the data directory. `predecessors`:
    the earlier study version's PDF reports it replaces (its Predecessor Documents Sequence)."""
    if not analysed:
        raise ValueError(f"{key}: no analysed eye to report")
    reports = {item.eye: item.report for item in analysed}
    header_ds = analysed[0].evidence[0]
    header = StudyHeader.from_dataset(header_ds, software=software(), made_at=made_at())
    pdf = build_pdf(header, reports, {item.eye: item.images for item in analysed})
    sources = [src for eye in Eye if eye in reports for src in reports[eye].sources]
    ds = build_encapsulated_pdf(pdf, header_ds, sources, key, software_version=software(), predecessors=predecessors)
    return str(write_result(Path(settings.data_dir), ds))
