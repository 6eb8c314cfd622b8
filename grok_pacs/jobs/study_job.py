"""One study, end to end inside a worker: one snapshot of the index (`snapshot.read_study`: instances with
their files resolved, version, per-eye candidates) handed down one way -> the eyes analysed
(`eye_analysis.analyse_eyes`: selection, gate, the engine once, dispositions; each `AnalysedEye` carries its
report, the headers the SR references and the images, decoded once) -> SRs and the PDF written -> outbox rows.

- An eye with a CFP or an OCT gets an SR (a missing or left-out modality is stated in it); an eye with
  neither gets none. A study with no analysable eye FAILS with the reason.
Idempotency: the SR of (study, version, bundle version, eye) has a derived UID; a DELIVERED or FAILED one
is kept as it is (not re-analysed, not re-sent); one already written but not yet delivered (a restart) is
delivered as it is, without running the model again; a missing one is built.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from grok_pacs.analysis.result import Eye
from grok_pacs.config import Settings
from grok_pacs.delivery import results
from grok_pacs.delivery.sender import write_result
from grok_pacs.jobs.eye_analysis import AnalysedEye, AnalysisEngine, analyse_eyes
from grok_pacs.jobs.pdf_report import write_pdf_report
from grok_pacs.jobs.snapshot import StudyOutcome, StudySnapshot
from grok_pacs.ops.phi import describe
from grok_pacs.report.keys import ReportKey
from grok_pacs.report.sr import SRKey, build_sr
from grok_pacs.store.blobs import BlobStore
from grok_pacs.store.files import DiskFullError
from grok_pacs.store.index import StudyIndex, StudyState
from grok_pacs.store.outbox import Outbox, OutboxEntry, OutboxRow, OutboxState, ResultKind

if TYPE_CHECKING:
    from grok_pacs.analysis.engine import Engine

log = logging.getLogger("grok_pacs.jobs.study_job")


class NoAnalysableEyeError(ValueError):
    """No eye of the study has a usable CFP or OCT; the message says what the study holds."""


@dataclass(frozen=True)
class StudyResult:
    study_uid: str
    version: int
    outcome: StudyOutcome
    entries: tuple[OutboxEntry, ...] = ()  #: outbox rows of this run, one per analysed eye
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResultKeys:
    """The derived UIDs of one (study, version, bundle version)'s results: an SR per eye, and the PDF."""

    srs: dict[Eye, SRKey]
    pdf: ReportKey

    @classmethod
    def of(cls, snapshot: StudySnapshot, bundle_version: str) -> ResultKeys:
        study_uid, version = snapshot.study_uid, snapshot.version
        srs = {eye: SRKey(study_uid, version, bundle_version, eye) for eye in Eye}
        return cls(srs, ReportKey(study_uid, version, bundle_version))


@dataclass(frozen=True)
class _Existing:
    """What earlier runs left of this key: results finished (DELIVERED or FAILED), results written but not
    delivered (reused as they are), and the eyes still to analyse. The PDF counts as one more result (eye None)."""

    finished: dict[Eye | None, OutboxEntry]
    built: dict[Eye | None, OutboxEntry]
    pending: list[Eye]


def _existing(
    settings: Settings, outbox: Outbox, store: BlobStore | None, snapshot: StudySnapshot, keys: ResultKeys
) -> _Existing:
    rows = [(eye, outbox.get(key.sop_instance_uid)) for eye, key in keys.srs.items()]
    rows.append((None, outbox.get(keys.pdf.sop_instance_uid)))  # treated like one more SR, so it is reused too
    done = (OutboxState.DELIVERED, OutboxState.FAILED)
    finished = {eye: e for eye, e in rows if e is not None and e.state in done}
    built = {
        eye: e
        for eye, e in rows  # written, not delivered: reuse
        if e is not None and eye not in finished and results.available(settings.data_dir, store, e.path)
    }
    eyes = snapshot.eyes
    pending = [eye for eye in Eye if eye not in finished and eye not in built and (eyes[eye].cfp or eyes[eye].oct)]
    return _Existing(finished, built, pending)


@dataclass(frozen=True)
class _Work:
    """What the claimed job analyses: the snapshot's pending eyes, their result keys, whether a PDF is made
    (only when every eye is analysed in this run) and where results go."""

    snapshot: StudySnapshot
    pending: list[Eye]
    keys: ResultKeys
    with_pdf: bool
    store: BlobStore | None


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
    study_uid, version, notes = snapshot.study_uid, snapshot.version, list(snapshot.notes)
    if snapshot.void is not None:
        log.info("job for study %s v%d skipped: %s", study_uid, version, snapshot.void.value)
        return StudyResult(study_uid, version, snapshot.void)
    keys = ResultKeys.of(snapshot, bundle_version)
    existing = _existing(settings, outbox, store, snapshot, keys)
    if existing.finished and not existing.pending and not existing.built:
        finished = tuple(existing.finished.values())
        return StudyResult(study_uid, version, StudyOutcome.ALREADY_DONE, finished, tuple(notes))
    entries = [*existing.finished.values(), *existing.built.values()]
    if not existing.pending and entries:
        return StudyResult(study_uid, version, StudyOutcome.ANALYSED, tuple(entries), tuple(notes))
    if not existing.pending:
        raise _no_analysable_eye(snapshot, notes)
    lease_s = settings.job_time_limit  # a claim older than a job may run belongs to a dead worker
    with index.analysing(study_uid, version, owner, lease_s=lease_s, detail=f"bundle {bundle_version}") as claimed:
        if not claimed:
            log.info("job for study %s v%d skipped: another job is analysing it", study_uid, version)
            return StudyResult(study_uid, version, StudyOutcome.BUSY)
        work = _Work(snapshot, existing.pending, keys, with_pdf=not entries, store=store)
        rows = _rows_or_wait(settings, index, engine, work, notes)
        # One transaction: SRs and PDF queued together; every row carries all notes (also an eye without an SR).
        entries.extend(outbox.put_many([dataclasses.replace(row, note="; ".join(notes)) for row in rows]))
    if not entries:
        raise _no_analysable_eye(snapshot, notes)
    return StudyResult(study_uid, version, StudyOutcome.ANALYSED, tuple(entries), tuple(notes))


def _rows_or_wait(
    settings: Settings,
    index: StudyIndex,
    engine: Callable[[], Engine | AnalysisEngine],
    work: _Work,
    notes: list[str],
) -> list[OutboxRow]:
    """The rows of the analysed eyes; a full disk puts the study back to QUEUED, saying why it waits."""
    try:
        return _analyse_into_rows(settings, engine(), work, notes)
    except DiskFullError as exc:  # transient: the job is retried; meanwhile the study says why it waits
        detail = f"waiting for disk space: writing the results failed ({exc.strerror}); retried automatically"
        index.set_state(work.snapshot.study_uid, StudyState.QUEUED, detail, version=work.snapshot.version)
        raise


def _analyse_into_rows(settings: Settings, engine: AnalysisEngine, work: _Work, notes: list[str]) -> list[OutboxRow]:
    """Run the model on the pending eyes and write their results: the outbox rows to add (not added yet)."""
    snapshot = work.snapshot
    eyes = [snapshot.eyes[eye] for eye in work.pending]
    analysed = analyse_eyes(settings, engine, eyes, snapshot.files, notes)
    rows = [_write_sr(settings, snapshot, item, work.keys.srs[item.eye]) for item in analysed]
    if settings.pdf_report and analysed and work.with_pdf:  # every eye's report is at hand
        rows.extend(_pdf_row(settings, snapshot, analysed, work.keys.pdf, notes))
    if work.store is not None:  # before the rows exist: a row never names an object that is not there
        rows = [
            dataclasses.replace(
                row, path=results.publish(settings.data_dir, work.store, snapshot.study_uid, row.sr_uid, row.path)
            )
            for row in rows
        ]
    return rows


def _write_sr(settings: Settings, snapshot: StudySnapshot, item: AnalysedEye, key: SRKey) -> OutboxRow:
    """Build and write one eye's SR (its point on the foveal pit from the images the report used)."""
    sr = build_sr(item.report, list(item.evidence), key, oct_pit=item.images.oct_pit)
    path = str(write_result(Path(settings.data_dir), sr))
    return OutboxRow(
        key.sop_instance_uid, snapshot.study_uid, snapshot.version, key.bundle_version, item.eye.value, path
    )


def _pdf_row(
    settings: Settings, snapshot: StudySnapshot, analysed: Sequence[AnalysedEye], key: ReportKey, notes: list[str]
) -> list[OutboxRow]:
    """The study's PDF report as an outbox row; a PDF that cannot be made is noted, never holds the SRs back."""
    try:
        path = write_pdf_report(settings, analysed, key)
    except DiskFullError:
        raise  # not this PDF's fault: the whole job waits for space and is retried
    except Exception as exc:  # noqa: BLE001 - the SRs go out regardless; the reason shows with the study
        log.exception("study %s v%d: PDF report not made", snapshot.study_uid, snapshot.version)
        notes.append(f"PDF report not made: {describe(exc)}")
        return []
    uid, bundle_version = key.sop_instance_uid, key.bundle_version
    return [OutboxRow(uid, snapshot.study_uid, snapshot.version, bundle_version, "", path, kind=ResultKind.PDF)]
