"""Results after delivery: each eye's result registered with its outbox rows (grok_pacs.store.register), a
later study version's results replacing the earlier ones, and an administrator's withdrawal.

Replacement: when a study gains instances after its results were made, the new version's SRs and PDF name
the earlier version's PENDING or DELIVERED results in their Predecessor Documents Sequence (an SR its eye's
earlier SR, the PDF the earlier PDF), and one IOCM rejection note (113001, quality) for those earlier SRs
and PDF is queued in the outbox in the same transaction as the new results, which also marks them REPLACED
in the register. The note's UID is derived from the UIDs it withdraws: a re-run rebuilds the same note, and
the outbox delivers it once. A REVIEWED result is not replaced: the clinician's verdict on it stands.

Withdrawal (`grok-pacs withdraw`): the study's current results (PENDING, DELIVERED, REVIEWED) get a
rejection note (quality or patient safety), queued with their WITHDRAWN marks in one transaction, audited.

References are built from the results' derived UIDs (grok_pacs.report.keys), with the patient and study
attributes of an instance of the study: the rejected objects' files need not be read.
"""

from __future__ import annotations

import getpass
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy.engine import Connection

from grok_pacs.analysis.result import Eye, Gradability, Report
from grok_pacs.config import Settings
from grok_pacs.delivery import results
from grok_pacs.delivery.sender import write_result
from grok_pacs.dicom.sop_classes import OPT
from grok_pacs.domain.labels import Label
from grok_pacs.ops import audit
from grok_pacs.ops.phi import describe
from grok_pacs.report.keys import ReportKey, SRKey
from grok_pacs.report.rejection import (
    COMPREHENSIVE_SR,
    ENCAPSULATED_PDF,
    KEY_OBJECT_SELECTION,
    RejectionReason,
    build_rejection_note,
    reference,
)
from grok_pacs.store.blobs import BlobError, BlobStore
from grok_pacs.store.index import StudyIndex, StudyState
from grok_pacs.store.outbox import Outbox, OutboxEntry, OutboxRow, ResultKind
from grok_pacs.store.register import (
    ResultRecord,
    ResultRegister,
    replace_records,
    withdraw_records,
)

log = logging.getLogger("grok_pacs.jobs.withdrawal")

#: `grok-pacs withdraw --reason` -> the note's title.
WITHDRAW_REASONS = {"quality": RejectionReason.QUALITY, "safety": RejectionReason.SAFETY}


class NothingToWithdrawError(LookupError):
    """The study has no result that stands at the PACS (none made, or all replaced or withdrawn already)."""


def stated_probability(report: Report) -> float | None:
    """The stated label's calibrated probability; for Indeterminate the best-scored label's; None when the
    eye is not gradable or the engine gave no scores."""
    if report.gradability is not Gradability.GRADABLE or not report.label_scores:
        return None
    if report.label is not Label.INDETERMINATE:
        return report.label_scores.get(report.label.value)
    return max(report.label_scores.values())


def result_record(report: Report, key: SRKey, pdf_uid: str) -> ResultRecord:
    """The register's row of one eye's SR (made from `report` under `key`)."""
    gradable = report.gradability is Gradability.GRADABLE
    oct_uid = next((s.sop_instance_uid for s in report.sources if s.sop_class_uid == OPT), "")
    cfp_uid = next((s.sop_instance_uid for s in report.sources if s.sop_class_uid != OPT), "")
    return ResultRecord(
        key.sop_instance_uid,
        key.study_uid,
        key.study_version,
        key.bundle_version,
        key.eye.value,
        label=report.label.value if gradable else "",
        probability=stated_probability(report),
        disposition=report.disposition.text if report.disposition is not None else "",
        gradability=report.gradability.value,
        pdf_uid=pdf_uid,
        cfp_uid=cfp_uid,
        oct_uid=oct_uid,
    )


def _sr_reference(record: ResultRecord, header: Dataset) -> Dataset:
    key = SRKey(record.study_uid, record.study_version, record.bundle_version, Eye(record.eye))
    if key.sop_instance_uid != record.sr_uid:
        raise ValueError(f"result {record.sr_uid} is not the SR of {key}: its series cannot be named")
    return reference(header, sop_class_uid=COMPREHENSIVE_SR, series_uid=key.series_uid, sop_instance_uid=record.sr_uid)


def _pdf_references(records: Sequence[ResultRecord], header: Dataset) -> list[Dataset]:
    """The distinct PDF reports of `records` (the eyes of one version share one)."""
    out: dict[str, Dataset] = {}
    for record in records:
        if not record.pdf_uid or record.pdf_uid in out:
            continue
        key = ReportKey(record.study_uid, record.study_version, record.bundle_version)
        if key.sop_instance_uid != record.pdf_uid:
            raise ValueError(f"result {record.sr_uid}: PDF {record.pdf_uid} is not the report of {key}")
        out[record.pdf_uid] = reference(
            header, sop_class_uid=ENCAPSULATED_PDF, series_uid=key.series_uid, sop_instance_uid=record.pdf_uid
        )
    return list(out.values())


def result_references(records: Sequence[ResultRecord], header: Dataset) -> list[Dataset]:
    """The SRs and PDF reports of `records`, as rejection-note targets (patient/study from `header`)."""
    return [_sr_reference(r, header) for r in records] + _pdf_references(records, header)


def note_row(
    settings: Settings, note: Dataset, version: int, bundle_version: str, store: BlobStore | None
) -> OutboxRow:
    """Write a rejection note beside the results (into the object store with one) as its outbox row."""
    path = str(write_result(Path(settings.data_dir), note))
    study_uid, uid = str(note.StudyInstanceUID), str(note.SOPInstanceUID)
    if store is not None:
        path = results.publish(settings.data_dir, store, study_uid, uid, path)
    return OutboxRow(uid, study_uid, version, bundle_version, "", path, kind=ResultKind.KOS)


@dataclass(frozen=True)
class Replacement:
    """The earlier results a new study version replaces (none: an empty replacement)."""

    replaced: tuple[ResultRecord, ...] = ()

    @classmethod
    def of(cls, register: ResultRegister, study_uid: str, version: int) -> Replacement:
        return cls(tuple(register.replaceable(study_uid, version)))

    def __bool__(self) -> bool:
        return bool(self.replaced)

    def sr_predecessors(self, eye: Eye, header: Dataset) -> list[Dataset]:
        return [_sr_reference(r, header) for r in self.replaced if r.eye == eye.value]

    def pdf_predecessors(self, header: Dataset) -> list[Dataset]:
        return _pdf_references(self.replaced, header)

    @property
    def key(self) -> str:
        return "replaced:" + ",".join(sorted(r.sr_uid for r in self.replaced))

    def note(self, header: Dataset, version: int) -> Dataset:
        """The rejection note (quality) for the replaced SRs and PDF reports."""
        return build_rejection_note(
            result_references(self.replaced, header),
            RejectionReason.QUALITY,
            self.key,
            description=f"Replaced by the AI results of study version {version} (more images arrived).",
        )

    def mark(self, conn: Connection, new_srs: Mapping[str, str], rejection_uid: str) -> None:
        """Mark the replaced results REPLACED, each by its eye's new SR (else the first new one)."""
        if not self.replaced:
            return
        fallback = next(iter(new_srs.values()))
        for record in self.replaced:
            replace_records(conn, [record.sr_uid], new_srs.get(record.eye, fallback), rejection_uid)


@dataclass(frozen=True)
class Withdrawal:
    """What `withdraw_study` did: the rejection note queued for the study's results."""

    study_uid: str
    reason: str
    records: tuple[ResultRecord, ...]
    entry: OutboxEntry  #: the rejection note's outbox row
    published: str = ""  #: why its delivery job was not published ("" when it was, or none was asked)

    @property
    def rejection_uid(self) -> str:
        return self.entry.sr_uid


def _study_header(
    settings: Settings, outbox: Outbox, store: BlobStore | None, records: Sequence[ResultRecord]
) -> Dataset:
    """Patient and study attributes for the note: read from the first of the results' files still kept."""
    problems = []
    for record in records:
        entry = outbox.get(record.sr_uid)
        if entry is None:
            problems.append(f"{record.sr_uid}: not in the outbox")
            continue
        try:
            return results.read(Path(settings.data_dir), store, entry.path)
        except (OSError, BlobError, ValueError, InvalidDicomError) as exc:
            problems.append(f"{record.sr_uid}: {describe(exc)}")
    raise NothingToWithdrawError(
        f"study {records[0].study_uid}: no result file is left to name the patient in a rejection note "
        f"({'; '.join(problems)})"
    )


def withdraw_study(
    settings: Settings,
    index: StudyIndex,
    outbox: Outbox,
    study_uid: str,
    reason: str,
    *,
    store: BlobStore | None = None,
    publish: Callable[[str, int], object] | None = None,
) -> Withdrawal:
    """Withdraw the study's current results: one rejection note queued in the outbox and the results
    marked WITHDRAWN (one transaction), the study DELIVERING until the note is at the PACS, the withdrawal
    audited, and the note's delivery published (`publish(uid, retry_number)`; the reaper and a worker's
    start pick it up otherwise). Raises NothingToWithdrawError when no result stands."""
    if reason not in WITHDRAW_REASONS:
        raise ValueError(f"withdraw reason must be one of {sorted(WITHDRAW_REASONS)}, not {reason!r}")
    register = ResultRegister(outbox.engine, schema_open=True)
    records = tuple(register.current(study_uid))
    if not records:
        raise NothingToWithdrawError(f"study {study_uid} has no result to withdraw (none made, or all withdrawn)")
    header = _study_header(settings, outbox, store, records)
    key = f"withdraw:{reason}:" + ",".join(sorted(r.sr_uid for r in records))
    note = build_rejection_note(
        result_references(records, header),
        WITHDRAW_REASONS[reason],
        key,
        description=f"AI results withdrawn by an administrator ({reason}).",
    )
    version = max(r.study_version for r in records)
    row = note_row(settings, note, version, records[-1].bundle_version, store)
    uids = [r.sr_uid for r in records]
    (entry,) = outbox.put_many([row], also=lambda conn: withdraw_records(conn, uids, reason, row.sr_uid))
    index.set_state(study_uid, StudyState.DELIVERING, "rejection note withdrawing the results waiting", version=version)
    classes = {COMPREHENSIVE_SR: len(records), KEY_OBJECT_SELECTION: 1}
    pdfs = {r.pdf_uid for r in records if r.pdf_uid}
    classes |= {ENCAPSULATED_PDF: len(pdfs)} if pdfs else {}
    audit.results_withdrawn(study_uid, getpass.getuser(), reason, row.sr_uid, classes)
    log.info(
        "study %s: %d result(s) withdrawn (%s), rejection note %s queued", study_uid, len(records), reason, row.sr_uid
    )
    return Withdrawal(study_uid, reason, records, entry, _publish(publish, row.sr_uid))


def _publish(publish: Callable[[str, int], object] | None, uid: str) -> str:
    """Publish the note's delivery job; "" when done, else why not. The note is already durable in the
    outbox and its study DELIVERING: a worker's start or the reaper delivers it without this job."""
    if publish is None:
        return ""
    try:
        publish(uid, 0)
    except Exception as exc:  # noqa: BLE001 - any broker failure: the outbox row is the record, not the job
        log.warning("rejection note %s: delivery job not published (%s); the reaper delivers it", uid, describe(exc))
        return describe(exc)
    return ""
