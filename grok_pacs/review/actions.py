"""What a clinician's review does: Accept or Correct queue a clinician-verified SR (grok_pacs.report.verified,
outbox kind VSR), Reject queues an IOCM rejection note for the AI SR (grok_pacs.report.rejection, kind KOS);
the register records the verdict, the audit trail the action, and the delivery job sends the instance once.

Order, so that a crash at any point loses nothing and sends nothing twice: the instance is built and written
first (its UID is derived from the AI SR and the decision, so a retry rebuilds the same one), then the
register's DELIVERED -> REVIEWED update claims the review (of two clinicians reviewing at once exactly one
wins; the other gets RegisterError and queues nothing), then the outbox row is added and its delivery job
published. A crash between the claim and the outbox row leaves a REVIEWED result without its row:
`Reviews.requeue_missing` (run when the page starts) queues it again.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import Engine

from grok_pacs.config import Settings
from grok_pacs.delivery import results
from grok_pacs.delivery.sender import write_result
from grok_pacs.domain.labels import Label
from grok_pacs.ops import audit
from grok_pacs.ops.phi import describe
from grok_pacs.report.rejection import RejectionReason, build_rejection_note
from grok_pacs.report.verified import Verification, build_verified_sr
from grok_pacs.review.accounts import Reviewer, Role
from grok_pacs.store.blobs import BlobStore
from grok_pacs.store.outbox import Outbox, OutboxRow, ResultKind
from grok_pacs.store.register import RegisterError, ResultRecord, ResultRegister, ResultState, ReviewOutcome

log = logging.getLogger("grok_pacs.review.actions")

#: Deliver one outbox row soon (serve and `grok-pacs review`: the delivery job on the broker).
Deliver = Callable[[str], None]
REJECTION_REASONS = {"quality": RejectionReason.QUALITY, "safety": RejectionReason.SAFETY}
REPAIR_WINDOW_S = 30 * 86400.0  # results made this recently are checked for a lost outbox row at start


class ReviewError(RuntimeError):
    """A review that cannot be done (the result is gone, reviewed by someone else, its SR unreadable)."""


@dataclass(frozen=True)
class Decision:
    """A clinician's verdict on one result: ACCEPTED, CORRECTED (with `label`) or REJECTED (with `reason`)."""

    outcome: ReviewOutcome
    label: Label | None = None
    reason: str = ""  #: "quality" or "safety" for REJECTED
    note: str = ""

    def __post_init__(self) -> None:
        if (self.outcome is ReviewOutcome.CORRECTED) != (self.label is not None):
            raise ReviewError("a correction, and only a correction, names the clinician's label")
        if (self.outcome is ReviewOutcome.REJECTED) != (self.reason in REJECTION_REASONS):
            raise ReviewError("a rejection, and only a rejection, gives a reason: quality or safety")
        if len(self.note) > 1024:
            raise ReviewError("the note is longer than 1024 characters")

    @property
    def stored_note(self) -> str:
        """The note as the register keeps it: a rejection's reason first ("[safety] ..."), so it is kept too."""
        return f"[{self.reason}] {self.note}".strip() if self.reason else self.note


class Reviews:
    """The review actions over the database (register, outbox) and the results' files."""

    def __init__(self, settings: Settings, engine: Engine, store: BlobStore | None, deliver: Deliver) -> None:
        self.settings, self.store, self.deliver = settings, store, deliver
        self.register, self.outbox = ResultRegister(engine), Outbox(engine)

    # --- reading ---------------------------------------------------------------------------------------
    def result_dataset(self, uid: str) -> Dataset:
        """A result grok-pacs made (AI SR, PDF report), from its outbox row's file or object."""
        entry = self.outbox.get(uid)
        if entry is None:
            raise ReviewError(f"result {uid} is not in the outbox")
        try:
            return results.read(Path(self.settings.data_dir), self.store, entry.path)
        except (OSError, ValueError) as exc:  # purged by retention, or unreadable
            raise ReviewError(f"result {uid} cannot be read: {describe(exc)}") from exc

    # --- the actions -----------------------------------------------------------------------------------
    def review(self, sr_uid: str, reviewer: Reviewer, decision: Decision, peer_host: str = "") -> ResultRecord:
        """Do the clinician's decision on the AI SR `sr_uid`; returns the result as reviewed."""
        if not reviewer.may_review:
            raise ReviewError(f"{reviewer.username} ({reviewer.role}) may not review results")
        record = self.register.get(sr_uid)
        if record is None:
            raise ReviewError(f"result {sr_uid} is not registered")
        instance, kind = self._build(record, reviewer, decision, None)
        uid = str(instance.SOPInstanceUID)
        path = self._write(instance)
        try:
            reviewed = self.register.record_review(
                sr_uid,
                outcome=decision.outcome,
                reviewer=reviewer.username,
                label=decision.label.value if decision.label is not None else "",
                note=decision.stored_note,
                verified_uid=uid if kind is ResultKind.VSR else "",
                rejection_uid=uid if kind is ResultKind.KOS else "",
            )
        except RegisterError as exc:
            current = self.register.get(sr_uid)
            if current is None or uid not in (current.verified_uid, current.rejection_uid):
                raise ReviewError(str(exc)) from exc
            if self.outbox.get(uid) is not None:
                raise ReviewError(f"result {sr_uid} is already reviewed: {current.review_outcome}") from exc
            reviewed = current  # this very decision was recorded before a failure queued it: queue it now
        self._queue(record, uid, path, kind)
        audit.result_reviewed(
            record.study_uid, reviewer.username, peer_host, f"{decision.outcome} {sr_uid}", {instance.SOPClassUID: 1}
        )
        log.info("result %s %s by %s: %s %s queued", sr_uid, decision.outcome, reviewer.username, kind, uid)
        return reviewed

    def requeue_missing(self, reviewers: Callable[[str], Reviewer | None]) -> list[str]:
        """Queue the instance of every recent review whose outbox row a crash lost; returns their UIDs."""
        since = dt.datetime.now(dt.UTC).timestamp() - REPAIR_WINDOW_S
        queued = []
        for record in self.register.worklist(states=(ResultState.REVIEWED,), since=since, limit=10_000):
            uid = record.verified_uid or record.rejection_uid
            if not uid or self.outbox.get(uid) is not None:
                continue
            reviewer = reviewers(record.reviewer) or Reviewer(record.reviewer, Role.REVIEWER)
            try:
                instance, kind = self._build(record, reviewer, _decision_of(record), record.reviewed_at)
            except ReviewError as exc:  # its AI SR is gone (retention): nothing left to send
                log.warning("reviewed result %s not queued again: %s", record.sr_uid, exc)
                continue
            self._queue(record, uid, self._write(instance), kind)
            queued.append(uid)
        if queued:
            log.warning("queued %d reviewed results whose outbox rows were lost", len(queued))
        return queued

    # --- steps ---------------------------------------------------------------------------------------------
    def _build(
        self, record: ResultRecord, reviewer: Reviewer, decision: Decision, at: float | None
    ) -> tuple[Dataset, ResultKind]:
        ai_sr = self.result_dataset(record.sr_uid)
        if decision.outcome is ReviewOutcome.REJECTED:
            what = f"Rejected by {reviewer.name} on review ({decision.reason}). {decision.note}".strip()
            key = f"review/{record.sr_uid}"
            note = build_rejection_note([ai_sr], REJECTION_REASONS[decision.reason], key, description=what[:1024])
            return note, ResultKind.KOS
        when = dt.datetime.fromtimestamp(at, dt.UTC) if at is not None else None
        verification = Verification(
            reviewer.name, self.settings.review_organization or "-", decision.label, decision.note, when
        )
        return build_verified_sr(ai_sr, verification), ResultKind.VSR

    def _write(self, instance: Dataset) -> str:
        path = str(write_result(Path(self.settings.data_dir), instance))
        if self.store is not None:  # any worker delivers it, as the AI's results
            path = results.publish(
                Path(self.settings.data_dir),
                self.store,
                str(instance.StudyInstanceUID),
                str(instance.SOPInstanceUID),
                path,
            )
        return path

    def _queue(self, record: ResultRecord, uid: str, path: str, kind: ResultKind) -> None:
        row = OutboxRow(uid, record.study_uid, record.study_version, record.bundle_version, record.eye, path, kind=kind)
        self.outbox.put_many([row])
        try:
            self.deliver(uid)
        except Exception as exc:  # noqa: BLE001 - the row is queued: the reaper or the next start sends it
            log.warning("delivery of %s not published now (the reaper will): %s", uid, describe(exc))


def _decision_of(record: ResultRecord) -> Decision:
    """The decision a REVIEWED result records (to rebuild its instance: same decision, same UID)."""
    outcome = ReviewOutcome(record.review_outcome)
    label = Label(record.reviewed_label) if outcome is ReviewOutcome.CORRECTED else None
    reason, note = "", record.review_note
    if outcome is ReviewOutcome.REJECTED:
        tag, _, rest = note.partition("]")
        reason, note = tag.removeprefix("["), rest.strip()
    return Decision(outcome, label, reason, note)
