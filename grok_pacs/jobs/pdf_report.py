"""The study's PDF report in the per-study job: pictures of what each eye's report used, the PDF, its
DICOM wrapper, written under `<data>/sr/<study>/` beside the SRs (the outbox delivers it like an SR).

Made only when every analysed eye's report is at hand (all eyes analysed in this run): a study version
whose SRs were made by an earlier run without a PDF (the setting was off, or an older release) keeps its
SRs and gets no PDF rather than a second model run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pydicom.dataset import Dataset

from grok_pacs.analysis.imaging import ImageReadError, read_cfp, read_oct_volume
from grok_pacs.analysis.preprocess import foveal_pit, to_uint8
from grok_pacs.analysis.result import Eye, Report, SourceImage
from grok_pacs.config import OPT, Settings
from grok_pacs.delivery.sender import write_sr
from grok_pacs.dicom.uids import resolve_inside
from grok_pacs.report.encapsulated import build_encapsulated_pdf
from grok_pacs.report.keys import ReportKey
from grok_pacs.report.pdf import ReportImages, build_pdf, made_at
from grok_pacs.report.study import StudyHeader
from grok_pacs.store.index import InstanceRecord

log = logging.getLogger("grok_pacs.jobs.pdf_report")


def software() -> str:
    try:
        return f"grok-pacs {version('grok-pacs')}"
    except PackageNotFoundError:
        return "grok-pacs (version unknown)"


def _pixels(settings: Settings, rec: InstanceRecord, src: SourceImage):
    """The image a report used as uint8: the CFP, or the OCT B-scan of `src.frame`. None when it does not
    decode (an ungradable pick): the PDF then says the image is not available."""
    path = resolve_inside(Path(settings.data_dir), rec.path)
    try:
        if src.sop_class_uid != OPT:
            return "cfp", read_cfp(path), None
        volume = read_oct_volume(path)
    except ImageReadError as exc:
        log.info("PDF report: image %s not shown: %s", src.sop_instance_uid, exc)
        return ("oct" if src.sop_class_uid == OPT else "cfp"), None, None
    frame = min(max((src.frame or volume.shape[0] // 2 + 1) - 1, 0), volume.shape[0] - 1)
    return "oct", to_uint8(volume[frame]), volume.shape[0]


def eye_images(settings: Settings, instances: Mapping[str, InstanceRecord], report: Report) -> ReportImages:
    """The images one eye's report used, read again from incoming/ (for the PDF and the SR's point on the
    foveal pit, looked for only where the B-scan selection found one)."""
    found: dict[str, object] = {}
    for src in report.sources:
        if src.sop_instance_uid in instances:
            kind, pixels, frames = _pixels(settings, instances[src.sop_instance_uid], src)
            found[kind], found[f"{kind}_frames"] = pixels, frames
    bscan = found.get("oct")
    pit = foveal_pit(bscan) if bscan is not None and report.oct_frame_method == "fovea" else None
    return ReportImages(cfp=found.get("cfp"), oct_bscan=bscan, oct_frames=found.get("oct_frames"), oct_pit=pit)


def write_pdf_report(
    settings: Settings,
    analysed: Sequence[tuple[Report, Sequence[Dataset]]],
    images: Mapping[Eye, ReportImages],
    key: ReportKey,
) -> str:
    """Build the study's PDF from the analysed eyes (report, evidence headers) and the images they used, and
    write it; returns its path relative to the data directory."""
    if not analysed:
        raise ValueError(f"{key}: no analysed eye to report")
    reports = {report.eye: report for report, _ in analysed}
    header_ds = analysed[0][1][0]
    header = StudyHeader.from_dataset(header_ds, software=software(), made_at=made_at())
    pdf = build_pdf(header, reports, images)
    sources = [src for eye in Eye if eye in reports for src in reports[eye].sources]
    ds = build_encapsulated_pdf(pdf, header_ds, sources, key, software_version=software())
    return str(write_sr(Path(settings.data_dir), ds))
