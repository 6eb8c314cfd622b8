"""One study, end to end inside a worker: one snapshot of the index (`read_study`: instances, version,
per-eye candidates) handed down one way -> gate per eye -> the engine once for all gradable eyes (one
batched generation) -> SR written -> outbox rows.

Selection (`grok_pacs.jobs.snapshot`): per eye the newest CFP and OCT; an instance whose header or pixels
cannot be read is skipped, the next newest is used, and the skip is noted.
- Gate (grok_pacs.analysis.quality), before any diagnosis: each modality's pick is judged gradable,
  ungradable or out of scope (a pick whose pixels never decode is ungradable). Only gradable modalities
  reach the engine; an eye with none gets an SR without diagnosis that gives the coded reasons.
- An eye with a CFP or an OCT gets an SR (a missing or left-out modality is stated in it); an eye with
  neither gets none. A study with no analysable eye FAILS with the reason.
Idempotency: the SR of (study, version, bundle version, eye) has a derived UID; a DELIVERED or FAILED one
is kept as it is (not re-analysed, not re-sent); one already written but not yet delivered (a restart) is
delivered as it is, without running the model again; a missing one is built.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pydicom
from pydicom.dataset import Dataset

from grok_pacs.analysis.imaging import EyeImages, ImageReadError, read_cfp, read_oct_volume
from grok_pacs.analysis.quality import QualityThresholds, judge, ungradable_report, with_learned
from grok_pacs.analysis.result import Eye, Gradability, ModalityQuality, Report, SourceImage
from grok_pacs.config import Settings
from grok_pacs.delivery import results
from grok_pacs.delivery.sender import write_sr
from grok_pacs.dicom.uids import resolve_inside
from grok_pacs.jobs.pdf_report import eye_images, write_pdf_report
from grok_pacs.jobs.snapshot import EyeCandidates, Kind, StudyOutcome, StudySnapshot
from grok_pacs.ops.phi import describe
from grok_pacs.report import dispositions
from grok_pacs.report.keys import ReportKey
from grok_pacs.report.pdf import ReportImages
from grok_pacs.report.sr import SRKey, build_sr
from grok_pacs.store.blobs import BlobStore
from grok_pacs.store.files import DiskFullError
from grok_pacs.store.index import InstanceRecord, StudyIndex, StudyState
from grok_pacs.store.outbox import Outbox, OutboxEntry, OutboxRow, OutboxState, ResultKind

if TYPE_CHECKING:
    from grok_pacs.analysis.engine import Engine

log = logging.getLogger("grok_pacs.jobs.pipeline")


class NoAnalysableEyeError(ValueError):
    """No eye of the study has a usable CFP or OCT; the message says what the study holds."""


class AnalysisEngine(Protocol):
    """What the pipeline needs of `grok_pacs.analysis.engine.Engine`."""

    bundle: Any  #: the served bundle (name, version): for reports made without running the model

    def analyze_batch(self, eyes: Sequence[EyeImages]) -> list[Report]: ...


@dataclass(frozen=True)
class StudyResult:
    study_uid: str
    version: int
    outcome: StudyOutcome
    entries: tuple[OutboxEntry, ...] = ()  #: outbox rows of this run, one per analysed eye
    notes: tuple[str, ...] = ()


def _header(settings: Settings, rec: InstanceRecord) -> Dataset:
    """The instance's header (SR evidence); ImageReadError when the file cannot be parsed."""
    path = resolve_inside(Path(settings.data_dir), rec.path)
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError, ValueError, EOFError) as exc:
        raise ImageReadError(f"{rec.path}: unreadable DICOM header: {describe(exc)}") from exc


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an error, shortened: study details stay one readable line. A library's message
    is left out (it may quote a patient attribute): `ops.phi.describe`."""
    text = describe(exc, limit)
    return text.split(": ", 1)[1] if ": " in text else text


def _read_pixels(settings: Settings, rec: InstanceRecord, kind: Kind):
    path = resolve_inside(Path(settings.data_dir), rec.path)
    return read_cfp(path) if kind is Kind.CFP else read_oct_volume(path)


def _first_usable(
    settings: Settings, queue: list[InstanceRecord], kind: Kind, notes: list[str]
) -> tuple[InstanceRecord, Dataset, Any, str | None] | None:
    """The newest candidate whose header and pixels read (unreadable ones skipped and noted); when none
    decodes, the newest with a readable header and its decode error (the gate calls it ungradable)."""
    undecoded = None
    for rec in queue:
        header = None
        try:
            header = _header(settings, rec)
            return rec, header, _read_pixels(settings, rec, kind), None
        except ImageReadError as exc:
            notes.append(f"{kind.value} {rec.sop_uid} skipped: {_first_line(exc)}")
            if undecoded is None and header is not None:
                undecoded = (rec, header, None, _first_line(exc))
    return undecoded


@dataclass(frozen=True)
class EyePlan:
    """One eye after selection and the gate: what goes to the engine (`images`, None when no modality is
    gradable), the gate's verdicts, and the headers the SR references."""

    eye: Eye
    verdicts: tuple[ModalityQuality, ...]
    sources: tuple[SourceImage, ...]
    evidence: tuple[Dataset, ...]
    images: EyeImages | None


def plan_eye(settings: Settings, cands: EyeCandidates, notes: list[str], engine: Any = None) -> EyePlan | None:
    """Gate the newest readable CFP and OCT of one eye (skips noted in `notes`), then the engine's learned
    quality head when its bundle has one; None when the eye has neither modality."""
    picks = {
        kind: pick
        for kind in Kind
        if (pick := _first_usable(settings, cands.cfp if kind is Kind.CFP else cands.oct, kind, notes))
    }
    if not picks:
        return None
    limits = QualityThresholds.from_settings(settings)
    verdicts = {
        kind: judge(kind.value, header, pixels, error, rec.sop_uid, limits)
        for kind, (rec, header, pixels, error) in picks.items()
    }
    head = getattr(engine, "quality_head", None)
    if head is not None:
        verdicts = {
            kind: with_learned(
                v,
                engine.learned_ungradability(kind.value, picks[kind][2])
                if v.gradability is Gradability.GRADABLE
                else None,
                head.threshold,
            )
            for kind, v in verdicts.items()
        }
    usable = {kind: pick for kind, pick in picks.items() if verdicts[kind].gradability is Gradability.GRADABLE}
    chosen = usable or picks  # nothing gradable: the SR references what was judged
    sources = tuple(SourceImage(rec.sop_class_uid, rec.sop_uid, rec.series_uid) for rec, _, _, _ in chosen.values())
    images = (
        EyeImages(
            cands.eye,
            usable[Kind.CFP][2] if Kind.CFP in usable else None,
            usable[Kind.OCT][2] if Kind.OCT in usable else None,
            sources,
        )
        if usable
        else None
    )
    return EyePlan(cands.eye, tuple(verdicts.values()), sources, tuple(h for _, h, _, _ in chosen.values()), images)


def analyse_eyes(
    settings: Settings, engine: AnalysisEngine, eyes: Sequence[EyeCandidates], notes: list[str]
) -> list[tuple[Report, list[Dataset]]]:
    """Gate each eye, then run the engine ONCE on every eye with a gradable modality (both eyes of a study
    in one batched generation); an eye none of whose modalities passes gets a report without diagnosis;
    an eye with neither modality gets nothing."""
    plans = [plan for cands in eyes if (plan := plan_eye(settings, cands, notes, engine)) is not None]
    batch = [plan.images for plan in plans if plan.images is not None]
    analysed = iter(engine.analyze_batch(batch) if batch else [])
    out = []
    for plan in plans:
        if plan.images is not None:
            report = dataclasses.replace(next(analysed), quality=plan.verdicts)
        else:
            report = ungradable_report(plan.eye, plan.verdicts, plan.sources, engine.bundle.name, engine.bundle.version)
        out.append((report, list(plan.evidence)))
    return out


def _no_analysable_eye(snapshot: StudySnapshot, notes: list[str]) -> NoAnalysableEyeError:
    return NoAnalysableEyeError(
        f"no readable CFP or OCT of a right or left eye (study holds {snapshot.holdings()})"
        + (f"; {'; '.join(notes)}" if notes else "")
    )


def run_study(
    settings: Settings,
    index: StudyIndex,
    outbox: Outbox,
    engine: Callable[[], Engine | AnalysisEngine],
    bundle_version: str,
    snapshot: StudySnapshot,
    *,
    owner: str,
    store: BlobStore | None = None,
) -> StudyResult:
    """Analyse one study version into outbox rows (delivery is the caller's next step).

    The index is written once here: the job `owner` claims the version (QUEUED -> ANALYSING, one
    conditional update) before the model runs, so a duplicate job for it runs nothing (BUSY); the
    caller writes the end state. `engine()` is called only once the study needs analysing (the first
    call in a worker loads the model, while the study already shows ANALYSING). With a `store`, each
    result is put into it and its outbox row holds the key (any worker can deliver it).
    """
    study_uid, version = snapshot.study_uid, snapshot.version
    if snapshot.void is not None:
        log.info("job for study %s v%d skipped: %s", study_uid, version, snapshot.void.value)
        return StudyResult(study_uid, version, snapshot.void)
    eyes, notes = snapshot.eyes, list(snapshot.notes)
    keys = {eye: SRKey(study_uid, version, bundle_version, eye) for eye in Eye}
    pdf_key = ReportKey(study_uid, version, bundle_version)
    existing = {eye: outbox.get(key.sop_instance_uid) for eye, key in keys.items()}
    existing_pdf = outbox.get(pdf_key.sop_instance_uid)  # treated like one more SR, so it is reused too
    finished = {
        eye: e
        for eye, e in [*existing.items(), (None, existing_pdf)]
        if e is not None and e.state in (OutboxState.DELIVERED, OutboxState.FAILED)
    }
    built = {
        eye: e
        for eye, e in [*existing.items(), (None, existing_pdf)]  # written, not delivered: reuse
        if e is not None and eye not in finished and results.available(settings.data_dir, store, e.path)
    }
    pending = [eye for eye in Eye if eye not in finished and eye not in built and (eyes[eye].cfp or eyes[eye].oct)]
    if finished and not pending and not built:
        return StudyResult(study_uid, version, StudyOutcome.ALREADY_DONE, tuple(finished.values()), tuple(notes))
    entries = [*finished.values(), *built.values()]
    if not pending and entries:
        return StudyResult(study_uid, version, StudyOutcome.ANALYSED, tuple(entries), tuple(notes))
    if not pending:
        raise _no_analysable_eye(snapshot, notes)
    lease_s = settings.job_time_limit  # a claim older than a job may run belongs to a dead worker
    with index.analysing(study_uid, version, owner, lease_s=lease_s, detail=f"bundle {bundle_version}") as claimed:
        if not claimed:
            log.info("job for study %s v%d skipped: another job is analysing it", study_uid, version)
            return StudyResult(study_uid, version, StudyOutcome.BUSY)
        try:
            rows = _analyse_into_rows(settings, engine, snapshot, pending, keys, pdf_key, notes, not entries, store)
        except DiskFullError as exc:  # transient: the job is retried; meanwhile the study says why it waits
            detail = f"waiting for disk space: writing the results failed ({exc.strerror}); retried automatically"
            index.set_state(study_uid, StudyState.QUEUED, detail, version=version)
            raise
        # One transaction: SRs and PDF queued together; every row carries all notes (also an eye without an SR).
        entries.extend(outbox.put_many([dataclasses.replace(row, note="; ".join(notes)) for row in rows]))
    if not entries:
        raise _no_analysable_eye(snapshot, notes)
    return StudyResult(study_uid, version, StudyOutcome.ANALYSED, tuple(entries), tuple(notes))


def _analyse_into_rows(
    settings: Settings,
    engine: Callable[[], Engine | AnalysisEngine],
    snapshot: StudySnapshot,
    pending: list[Eye],
    keys: dict[Eye, SRKey],
    pdf_key: ReportKey,
    notes: list[str],
    with_pdf: bool,
    store: BlobStore | None,
) -> list[OutboxRow]:
    """Run the model on the pending eyes and write their results: the outbox rows to add (not added yet)."""
    study_uid, version, bundle_version = snapshot.study_uid, snapshot.version, keys[Eye.RIGHT].bundle_version
    analysed = _analyse_and_write(
        settings, engine(), snapshot.eyes, pending, keys, notes, {rec.sop_uid: rec for rec in snapshot.instances}
    )
    rows = [
        OutboxRow(keys[report.eye].sop_instance_uid, study_uid, version, bundle_version, report.eye.value, path)
        for report, _, path, _ in analysed
    ]
    if settings.pdf_report and analysed and with_pdf:  # every eye's report is at hand
        rows.extend(_pdf_row(settings, snapshot, analysed, pdf_key, notes))
    if store is not None:  # before the rows exist: a row never names an object that is not there
        rows = [
            dataclasses.replace(row, path=results.publish(settings.data_dir, store, study_uid, row.sr_uid, row.path))
            for row in rows
        ]
    return rows


def _pdf_row(
    settings: Settings,
    snapshot: StudySnapshot,
    analysed: list[tuple[Report, list[Dataset], str, ReportImages]],
    key: ReportKey,
    notes: list[str],
) -> list[OutboxRow]:
    """The study's PDF report as an outbox row; a PDF that cannot be made is noted, never holds the SRs back."""
    try:
        path = write_pdf_report(
            settings, [(r, ev) for r, ev, _, _ in analysed], {r.eye: pictures for r, _, _, pictures in analysed}, key
        )
    except DiskFullError:
        raise  # not this PDF's fault: the whole job waits for space and is retried
    except Exception as exc:  # noqa: BLE001 - the SRs go out regardless; the reason shows with the study
        log.exception("study %s v%d: PDF report not made", snapshot.study_uid, snapshot.version)
        notes.append(f"PDF report not made: {describe(exc)}")
        return []
    return [
        OutboxRow(
            key.sop_instance_uid,
            snapshot.study_uid,
            snapshot.version,
            key.bundle_version,
            "",
            path,
            kind=ResultKind.PDF,
        )
    ]


def _analyse_and_write(
    settings: Settings,
    engine: AnalysisEngine,
    eyes: Mapping[Eye, EyeCandidates],
    pending: list[Eye],
    keys: Mapping[Eye, SRKey],
    notes: list[str],
    instances: Mapping[str, InstanceRecord],
) -> list[tuple[Report, list[Dataset], str, ReportImages]]:
    """Analyse each pending eye, give each its disposition and the patient roll-up over them, and write
    their SRs under sr/; returns (report, evidence headers, SR path, images used); skips go to `notes`."""
    analysed = analyse_eyes(settings, engine, [eyes[eye] for eye in pending], notes)
    reports = dispositions.apply(
        [report for report, _ in analysed], dispositions.load_table(settings.disposition_table)
    )
    data_dir = Path(settings.data_dir)
    written = []
    for report, (_, evidence) in zip(reports, analysed):
        pictures = eye_images(settings, instances, report)  # for the SR's point on the pit, and the PDF
        sr = build_sr(report, evidence, keys[report.eye], oct_pit=pictures.oct_pit)
        written.append((report, evidence, str(write_sr(data_dir, sr)), pictures))
    return written
