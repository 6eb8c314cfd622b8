"""One study, end to end inside a worker: one snapshot of the index (`snapshot.read_study`: instances with
their files resolved, version, per-eye candidates) handed down one way -> the eyes analysed
(`eye_analysis.analyse_eyes`: selection, gate, the engine once, dispositions; each `AnalysedEye` carries its
report, the headers the SR references and the images, decoded once) -> SRs and the PDF written -> outbox rows,
with each eye's result registered (grok_pacs.store.register) in the same transaction. A new version's results
replace the earlier version's (grok_pacs.jobs.withdrawal): predecessors named, one rejection note queued.

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

from sqlalchemy.engine import Connection

from grok_pacs.analysis.result import Eye
from grok_pacs.config import Settings
from grok_pacs.delivery import results
from grok_pacs.delivery.sender import write_result
from grok_pacs.jobs.eye_analysis import AnalysedEye, AnalysisEngine, analyse_eyes
from grok_pacs.jobs.pdf_report import write_pdf_report
from grok_pacs.jobs.snapshot import StudyOutcome, StudySnapshot
from grok_pacs.jobs.withdrawal import Replacement, note_row, result_record
from grok_pacs.ops.phi import describe
from grok_pacs.report.keys import ReportKey
from grok_pacs.report.sr import SRKey, build_sr
from grok_pacs.store.blobs import BlobStore
from grok_pacs.store.files import DiskFullError
from grok_pacs.store.index import StudyIndex, StudyState
from grok_pacs.store.outbox import Outbox, OutboxEntry, OutboxRow, OutboxState, ResultKind
from grok_pacs.store.register import ResultRecord, ResultRegister, add_records

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
    replacement: Replacement = Replacement()  #: earlier versions' results these replace


@dataclass(frozen=True)
class _Built:
    """What one run made: the outbox rows, the register's rows of its SRs, the rejection note's UID ("" when
    it replaces nothing). `commit(conn)` registers them, in the outbox's transaction."""

    rows: list[OutboxRow]
    records: list[ResultRecord]
    replacement: Replacement = Replacement()
    note_uid: str = ""

    def commit(self, conn: Connection) -> None:
        add_records(conn, self.records)
        if self.note_uid:
            self.replacement.mark(conn, {r.eye: r.sr_uid for r in self.records}, self.note_uid)


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
        replacement = Replacement.of(ResultRegister(outbox.engine, schema_open=True), study_uid, version)
        work = _Work(snapshot, existing.pending, keys, with_pdf=not entries, store=store, replacement=replacement)
        built = _rows_or_wait(settings, index, engine, work, notes)
        # One transaction: SRs, PDF and rejection note queued, their results registered (the replaced ones
        # marked) together; every row carries all notes (also an eye without an SR).
        rows = [dataclasses.replace(row, note="; ".join(notes)) for row in built.rows]
        entries.extend(outbox.put_many(rows, also=built.commit))
    if not entries:
        raise _no_analysable_eye(snapshot, notes)
    return StudyResult(study_uid, version, StudyOutcome.ANALYSED, tuple(entries), tuple(notes))


def _rows_or_wait(
    settings: Settings,
    index: StudyIndex,
    engine: Callable[[], Engine | AnalysisEngine],
    work: _Work,
    notes: list[str],
) -> _Built:
    """The rows of the analysed eyes; a full disk puts the study back to QUEUED, saying why it waits."""
    try:
        return _analyse_into_rows(settings, engine(), work, notes)
    except DiskFullError as exc:  # transient: the job is retried; meanwhile the study says why it waits
        detail = f"waiting for disk space: writing the results failed ({exc.strerror}); retried automatically"
        index.set_state(work.snapshot.study_uid, StudyState.QUEUED, detail, version=work.snapshot.version)
        raise


def _analyse_into_rows(settings: Settings, engine: AnalysisEngine, work: _Work, notes: list[str]) -> _Built:
    """Run the model on the pending eyes and write their results: the outbox rows to add (not added yet),
    with the rejection note of the results they replace."""
    snapshot, replacement = work.snapshot, work.replacement
    eyes = [snapshot.eyes[eye] for eye in work.pending]
    analysed = analyse_eyes(settings, engine, eyes, snapshot.files, notes)
    rows = [_write_sr(settings, snapshot, item, work.keys.srs[item.eye], replacement) for item in analysed]
    pdf_rows: list[OutboxRow] = []
    if settings.pdf_report and analysed and work.with_pdf:  # every eye's report is at hand
        pdf_rows = _pdf_row(settings, snapshot, analysed, work.keys.pdf, notes, replacement)
    pdf_uid = pdf_rows[0].sr_uid if pdf_rows else ""
    records = [result_record(item.report, work.keys.srs[item.eye], pdf_uid) for item in analysed]
    rows.extend(pdf_rows)
    note_uid = ""
    if replacement and analysed:
        note = replacement.note(analysed[0].evidence[0], snapshot.version)
        rows.append(note_row(settings, note, snapshot.version, work.keys.pdf.bundle_version, None))
        note_uid = str(note.SOPInstanceUID)
    if work.store is not None:  # before the rows exist: a row never names an object that is not there
        rows = [
            dataclasses.replace(
                row, path=results.publish(settings.data_dir, work.store, snapshot.study_uid, row.sr_uid, row.path)
            )
            for row in rows
        ]
    return _Built(rows, records, replacement, note_uid)


def _write_sr(
    settings: Settings, snapshot: StudySnapshot, item: AnalysedEye, key: SRKey, replacement: Replacement
) -> OutboxRow:
    """Build and write one eye's SR (its point on the foveal pit from the images the report used), naming
    the earlier SR of its eye it replaces."""
    previous = replacement.sr_predecessors(item.eye, item.evidence[0])
    sr = build_sr(item.report, list(item.evidence), key, oct_pit=item.images.oct_pit, previous_versions=previous)
    path = str(write_result(Path(settings.data_dir), sr))
    return OutboxRow(
        key.sop_instance_uid, snapshot.study_uid, snapshot.version, key.bundle_version, item.eye.value, path
    )


def _pdf_row(
    settings: Settings,
    snapshot: StudySnapshot,
    analysed: Sequence[AnalysedEye],
    key: ReportKey,
    notes: list[str],
    replacement: Replacement,
) -> list[OutboxRow]:
    """The study's PDF report as an outbox row; a PDF that cannot be made is noted, never holds the SRs back."""
    try:
        path = write_pdf_report(settings, analysed, key, replacement.pdf_predecessors(analysed[0].evidence[0]))
    except DiskFullError:
        raise  # not this PDF's fault: the whole job waits for space and is retried
    except Exception as exc:  # noqa: BLE001 - the SRs go out regardless; the reason shows with the study
        log.exception("study %s v%d: PDF report not made", snapshot.study_uid, snapshot.version)
        notes.append(f"PDF report not made: {describe(exc)}")
        return []
    uid, bundle_version = key.sop_instance_uid, key.bundle_version
    return [OutboxRow(uid, snapshot.study_uid, snapshot.version, bundle_version, "", path, kind=ResultKind.PDF)]
