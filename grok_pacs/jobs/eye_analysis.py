"""The eyes of one study job, from the snapshot's candidates to `AnalysedEye`s: selection, the gate, the
engine once for all gradable eyes, the dispositions, and the images each report used.

Each picked instance's file is read and its pixels decoded ONCE, here: the same arrays go to the gate, the
engine, the SR's point on the foveal pit and the PDF (`AnalysedEye.images`).

Selection: per eye the newest CFP and OCT; an instance whose header or pixels cannot be read is skipped,
the next newest is used, and the skip is noted. When none decodes, the newest with a readable header is
kept with its decode error, and the gate calls it ungradable.
Gate (grok_pacs.analysis.quality), before any diagnosis: each modality's pick is judged gradable,
ungradable or out of scope, then by the bundle's learned quality head when it has one. Only gradable
modalities reach the engine; an eye with none gets a report without diagnosis that gives the coded
reasons, and references what was judged.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from grok_pacs.analysis.imaging import EyeImages, ImageReadError, read_cfp, read_oct_volume
from grok_pacs.analysis.preprocess import foveal_pit, to_uint8
from grok_pacs.analysis.quality import QualityThresholds, judge, ungradable_report, with_learned
from grok_pacs.analysis.result import Eye, Gradability, ModalityQuality, Report, SourceImage
from grok_pacs.config import Settings
from grok_pacs.jobs.snapshot import EyeCandidates, Kind
from grok_pacs.ops.phi import describe
from grok_pacs.report import dispositions
from grok_pacs.report.pdf import ReportImages
from grok_pacs.store.index import InstanceRecord

log = logging.getLogger("grok_pacs.jobs.eye_analysis")


class AnalysisEngine(Protocol):
    """What the study job needs of `grok_pacs.analysis.engine.Engine`."""

    bundle: Any  #: the served bundle (name, version): for reports made without running the model

    def analyze_batch(self, eyes: Sequence[EyeImages]) -> list[Report]: ...


@dataclass(frozen=True)
class Pick:
    """One modality's chosen instance, read once: its header (SR evidence) and its decoded pixels (None when
    they do not decode: `error` says why)."""

    kind: Kind
    rec: InstanceRecord
    header: Dataset
    pixels: np.ndarray | None
    error: str | None = None

    @property
    def source(self) -> SourceImage:
        return SourceImage(self.rec.sop_class_uid, self.rec.sop_uid, self.rec.series_uid)


@dataclass(frozen=True)
class EyePlan:
    """One eye after selection and the gate: the gate's verdicts, the picks the report references (the
    gradable ones, else all that were judged) and what goes to the engine (None when nothing is gradable)."""

    eye: Eye
    verdicts: tuple[ModalityQuality, ...]
    chosen: tuple[Pick, ...]
    images: EyeImages | None

    @property
    def sources(self) -> tuple[SourceImage, ...]:
        return tuple(pick.source for pick in self.chosen)


@dataclass(frozen=True)
class AnalysedEye:
    """One analysed eye, from planning to SR and PDF: its report (with its disposition), the headers the SR
    references, and the images the report used (the CFP, the OCT B-scan, its foveal pit), decoded once."""

    report: Report
    evidence: tuple[Dataset, ...]
    images: ReportImages

    @property
    def eye(self) -> Eye:
        return self.report.eye


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an error, shortened: study details stay one readable line. A library's message
    is left out (it may quote a patient attribute): `ops.phi.describe`."""
    text = describe(exc, limit)
    return text.split(": ", 1)[1] if ": " in text else text


def _header(rec: InstanceRecord, path: Path) -> Dataset:
    """The instance's header (SR evidence); ImageReadError when the file cannot be parsed."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError, ValueError, EOFError) as exc:
        raise ImageReadError(f"{rec.path}: unreadable DICOM header: {describe(exc)}") from exc


def _first_usable(
    queue: Sequence[InstanceRecord], kind: Kind, files: Mapping[str, Path], notes: list[str]
) -> Pick | None:
    """The newest candidate whose header and pixels read (unreadable ones skipped and noted); when none
    decodes, the newest with a readable header and its decode error (the gate calls it ungradable)."""
    undecoded = None
    for rec in queue:
        header = None
        try:
            header = _header(rec, files[rec.sop_uid])
            pixels = read_cfp(files[rec.sop_uid]) if kind is Kind.CFP else read_oct_volume(files[rec.sop_uid])
            return Pick(kind, rec, header, pixels)
        except ImageReadError as exc:
            notes.append(f"{kind.value} {rec.sop_uid} skipped: {_first_line(exc)}")
            if undecoded is None and header is not None:
                undecoded = Pick(kind, rec, header, None, _first_line(exc))
    return undecoded


def _verdicts(settings: Settings, picks: Sequence[Pick], engine: Any) -> tuple[ModalityQuality, ...]:
    """The rule-based gate on each pick, then the engine's learned quality head when its bundle has one."""
    limits = QualityThresholds.from_settings(settings)
    verdicts = [judge(p.kind.value, p.header, p.pixels, p.error, p.rec.sop_uid, limits) for p in picks]
    head = getattr(engine, "quality_head", None)
    if head is None:
        return tuple(verdicts)
    return tuple(
        with_learned(v, engine.learned_ungradability(p.kind.value, p.pixels), head.threshold)
        if v.gradability is Gradability.GRADABLE
        else v
        for p, v in zip(picks, verdicts)
    )


def plan_eye(
    settings: Settings, cands: EyeCandidates, files: Mapping[str, Path], notes: list[str], engine: Any = None
) -> EyePlan | None:
    """Gate the newest readable CFP and OCT of one eye (skips noted in `notes`); None when the eye has
    neither modality."""
    queues = {Kind.CFP: cands.cfp, Kind.OCT: cands.oct}
    picks = [pick for kind in Kind if (pick := _first_usable(queues[kind], kind, files, notes))]
    if not picks:
        return None
    verdicts = _verdicts(settings, picks, engine)
    usable = [p for p, v in zip(picks, verdicts) if v.gradability is Gradability.GRADABLE]
    chosen = tuple(usable or picks)  # nothing gradable: the report references what was judged
    plan = EyePlan(cands.eye, verdicts, chosen, None)
    if not usable:
        return plan
    pixels = {p.kind: p.pixels for p in usable}
    images = EyeImages(cands.eye, pixels.get(Kind.CFP), pixels.get(Kind.OCT), plan.sources)
    return dataclasses.replace(plan, images=images)


def _reports(plans: Sequence[EyePlan], engine: AnalysisEngine) -> list[Report]:
    """The engine ONCE on every plan with a gradable modality (both eyes in one batched generation); a
    report without diagnosis for the others."""
    batch = [plan.images for plan in plans if plan.images is not None]
    analysed = iter(engine.analyze_batch(batch) if batch else [])
    name, version = engine.bundle.name, engine.bundle.version
    return [
        dataclasses.replace(next(analysed), quality=plan.verdicts)
        if plan.images is not None
        else ungradable_report(plan.eye, plan.verdicts, plan.sources, name, version)
        for plan in plans
    ]


def _shown(pick: Pick, src: SourceImage) -> tuple[str, np.ndarray | None, int | None]:
    """(kind, uint8 pixels, frames) of the image a report used: the CFP, or the OCT B-scan of `src.frame`
    (the middle one when the report chose none). No pixels when they did not decode (an ungradable pick)."""
    kind = "oct" if pick.kind is Kind.OCT else "cfp"
    if pick.pixels is None:
        log.info("PDF report: image %s not shown: %s", src.sop_instance_uid, pick.error)
        return kind, None, None
    if pick.kind is Kind.CFP:
        return kind, pick.pixels, None
    frames = pick.pixels.shape[0]
    frame = min(max((src.frame or frames // 2 + 1) - 1, 0), frames - 1)
    return kind, to_uint8(pick.pixels[frame]), frames


def report_images(report: Report, picks: Sequence[Pick]) -> ReportImages:
    """The images one eye's report used, from the pixels decoded for planning (for the PDF and the SR's
    point on the foveal pit, looked for only where the B-scan selection found one)."""
    by_uid = {pick.rec.sop_uid: pick for pick in picks}
    found: dict[str, Any] = {}
    for src in report.sources:
        if src.sop_instance_uid in by_uid:
            kind, pixels, frames = _shown(by_uid[src.sop_instance_uid], src)
            found[kind], found[f"{kind}_frames"] = pixels, frames
    bscan = found.get("oct")
    pit = foveal_pit(bscan) if bscan is not None and report.oct_frame_method == "fovea" else None
    return ReportImages(cfp=found.get("cfp"), oct_bscan=bscan, oct_frames=found.get("oct_frames"), oct_pit=pit)


def analyse_eyes(
    settings: Settings,
    engine: AnalysisEngine,
    eyes: Sequence[EyeCandidates],
    files: Mapping[str, Path],
    notes: list[str],
) -> list[AnalysedEye]:
    """Gate each eye, run the engine once, give each report its disposition and the patient roll-up over
    them; an eye with neither modality gets nothing. Skips go to `notes`."""
    plans = [plan for cands in eyes if (plan := plan_eye(settings, cands, files, notes, engine)) is not None]
    reports = dispositions.apply(_reports(plans, engine), dispositions.load_table(settings.disposition_table))
    return [
        AnalysedEye(report, tuple(p.header for p in plan.chosen), report_images(report, plan.chosen))
        for report, plan in zip(reports, plans)
    ]
