"""Durable outbox of result instances waiting for delivery: one row per SOP Instance UID in the `outbox`
table of the index database (`db`). A result is an eye's SR (`kind` SR), the study's PDF report (`kind`
PDF, eye empty), a rejection note withdrawing earlier results (`kind` KOS, eye empty when study-wide) or a
clinician-verified SR (`kind` VSR); the column keeps its historical name `sr_uid`.

The row is the delivery's state machine, so that a result survives worker restarts and is sent to the PACS
at most once per claim:

    PENDING --claim--> SENDING --stored--> DELIVERED          (terminal)
       ^                 |  \\--permanent--> FAILED            (terminal)
       +---transient-----+
    SENDING whose claim is older than its lease (the sender died) may be claimed again.

The SR's SOP Instance UID is the primary key: a re-run of the same (study, version, bundle, eye) finds
the same row; a DELIVERED row is never sent again. Recording a row DELIVERED also marks its result
DELIVERED in the results register (grok_pacs.store.register), in the same transaction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, and_, false, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from grok_pacs.store import db, register, schema


class ResultKind(StrEnum):
    SR = "SR"  #: one eye's DICOM SR
    PDF = "PDF"  #: the study's Encapsulated PDF report
    KOS = "KOS"  #: an IHE IOCM rejection note (Key Object Selection) withdrawing earlier results
    VSR = "VSR"  #: a clinician-verified SR (a review's Accept or Correct)


class OutboxState(StrEnum):
    PENDING = "PENDING"
    SENDING = "SENDING"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"


@dataclass(frozen=True)
class OutboxEntry:
    sr_uid: str
    study_uid: str
    study_version: int
    bundle_version: str
    eye: str
    path: str  #: relative to the data directory
    state: OutboxState
    attempts: int
    last_error: str
    claimed_by: str
    claimed_at: float | None
    destination: str
    note: str  #: what the pipeline wants shown with the study (e.g. an unreadable instance skipped)
    created_at: float
    updated_at: float
    delivered_at: float | None
    kind: ResultKind = ResultKind.SR


@dataclass(frozen=True)
class OutboxRow:
    """What `put_many` adds: one result file to deliver."""

    sr_uid: str  #: the result's SOP Instance UID
    study_uid: str
    study_version: int
    bundle_version: str
    eye: str  #: "R"/"L" for an SR, "" for the study's PDF
    path: str  #: relative to the data directory, or an object-store key (grok_pacs.delivery.results)
    note: str = ""
    kind: ResultKind = ResultKind.SR


class OutboxError(RuntimeError):
    """An outbox operation on a row that is not in the state it needs (names the row and state)."""


class Outbox:
    """The outbox table; every call is one short transaction, so several processes can share it.

    `target` is a database URL, an SQLite file path (the embedded index) or an engine to share.
    """

    def __init__(self, target: str | Path | Engine) -> None:
        self._owns_engine = not isinstance(target, Engine)
        self.engine = db.open_engine(target) if not isinstance(target, Engine) else target
        schema.open_schema(self.engine)  # SQLite: also adds `kind` to an outbox made before it

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()

    @staticmethod
    def _entry(row: Any) -> OutboxEntry | None:
        if row is None:
            return None
        values = dict(row._mapping)
        values["state"] = OutboxState(values["state"])
        values["kind"] = ResultKind(values["kind"])
        return OutboxEntry(**values)

    @staticmethod
    def _get(conn: Connection, sr_uid: str) -> OutboxEntry | None:
        return Outbox._entry(conn.execute(select(db.outbox).where(db.outbox.c.sr_uid == sr_uid)).first())

    def get(self, sr_uid: str) -> OutboxEntry | None:
        with db.transaction(self.engine, write=False) as conn:
            return self._get(conn, sr_uid)

    def put(
        self,
        *,
        sr_uid: str,
        study_uid: str,
        study_version: int,
        bundle_version: str,
        eye: str,
        path: str,
        note: str = "",
        kind: ResultKind = ResultKind.SR,
    ) -> OutboxEntry:
        """Add a result, or replace a not-yet-sent one with the same UID (a re-run of the same job).

        DELIVERED and FAILED rows are terminal and left as they are: exactly one delivery per UID, and
        a permanent rejection is never retried by a redelivered job. (A study that changes gets a new
        version, hence new UIDs.)
        """
        return self.put_many([OutboxRow(sr_uid, study_uid, study_version, bundle_version, eye, path, note, kind)])[0]

    def put_many(self, rows: list[OutboxRow], *, also: Callable[[Connection], None] | None = None) -> list[OutboxEntry]:
        """`put` for several results in ONE transaction: a study run's SRs and PDF appear together or not
        at all, so a crash never leaves some of them queued and the others unmade. `also(conn)` runs in
        the same transaction (the study job registers the results there: grok_pacs.store.register).

        Each row is one statement (insert, or on conflict refresh a PENDING row only), so two jobs putting
        the same UID at once never both insert, on either dialect."""
        table = db.outbox
        entries = []
        with db.transaction(self.engine) as conn:
            stamp = db.now(conn)
            for row in rows:
                new = db.insert(conn, table).values(
                    sr_uid=row.sr_uid,
                    study_uid=row.study_uid,
                    study_version=row.study_version,
                    bundle_version=row.bundle_version,
                    eye=row.eye,
                    path=row.path,
                    state=OutboxState.PENDING.value,
                    note=row.note,
                    created_at=stamp,
                    updated_at=stamp,
                    kind=ResultKind(row.kind).value,
                )
                conn.execute(
                    new.on_conflict_do_update(
                        index_elements=[table.c.sr_uid],
                        set_={
                            "path": new.excluded.path,
                            "last_error": "",
                            "note": new.excluded.note,
                            "updated_at": stamp,
                        },
                        where=table.c.state == OutboxState.PENDING.value,
                    )
                )
                entry = self._get(conn, row.sr_uid)
                assert entry is not None
                entries.append(entry)
            if also is not None:
                also(conn)
        return entries

    def claim(self, sr_uid: str, owner: str, *, lease_s: float) -> OutboxEntry | None:
        """Take the row for sending: PENDING, or SENDING by the same owner or with an expired lease.

        One conditional UPDATE ... RETURNING: of two callers racing for a row, exactly one gets it.
        Returns the claimed entry, or None when the row is DELIVERED, FAILED or sent by someone else now.
        Raises OutboxError when no such SR is in the outbox.
        """
        table = db.outbox
        with db.transaction(self.engine) as conn:
            stamp = db.now(conn)
            claimed = conn.execute(
                update(table)
                .where(table.c.sr_uid == sr_uid, self._claimable(conn, owner, lease_s))
                .values(
                    state=OutboxState.SENDING.value,
                    claimed_by=owner,
                    claimed_at=stamp,
                    attempts=table.c.attempts + 1,
                    updated_at=stamp,
                )
                .returning(*table.columns)
            ).first()
            if claimed is None and self._get(conn, sr_uid) is None:
                raise OutboxError(f"SR {sr_uid} is not in the outbox")
            return self._entry(claimed)

    @staticmethod
    def _claimable(conn: Connection, owner: str, lease_s: float) -> ColumnElement[bool]:
        """PENDING, or SENDING by `owner`, or SENDING with a lease older than `lease_s` (database time)."""
        table = db.outbox
        sending = table.c.state == OutboxState.SENDING.value
        expired = false() if math.isinf(lease_s) else table.c.claimed_at < db.now(conn) - lease_s
        return or_(table.c.state == OutboxState.PENDING.value, and_(sending, or_(table.c.claimed_by == owner, expired)))

    def _finish(self, sr_uid: str, owner: str, state: OutboxState, error: str, destination: str = "") -> OutboxEntry:
        table = db.outbox
        with db.transaction(self.engine) as conn:
            stamp = db.now(conn)
            done = conn.execute(
                update(table)
                .where(
                    table.c.sr_uid == sr_uid,
                    table.c.state == OutboxState.SENDING.value,
                    table.c.claimed_by == owner,
                )
                .values(
                    state=state.value,
                    last_error=error,
                    destination=destination,
                    updated_at=stamp,
                    claimed_by="",
                    delivered_at=stamp if state is OutboxState.DELIVERED else None,
                )
                .returning(*table.columns)
            ).first()
            if done is None:
                current = self._get(conn, sr_uid)
                found = "missing" if current is None else f"{current.state} by {current.claimed_by!r}"
                raise OutboxError(f"SR {sr_uid}: expected SENDING by {owner!r}, found {found}")
            if state is OutboxState.DELIVERED:  # the result's register row follows, in this transaction
                register.deliver_record(conn, sr_uid, done.delivered_at)
            entry = self._entry(done)
            assert entry is not None
            return entry

    def mark_delivered(self, sr_uid: str, owner: str, destination: str) -> OutboxEntry:
        return self._finish(sr_uid, owner, OutboxState.DELIVERED, "", destination)

    def release(self, sr_uid: str, owner: str, error: str) -> OutboxEntry:
        """A transient failure: back to PENDING, the reason kept for `grok-pacs studies`."""
        return self._finish(sr_uid, owner, OutboxState.PENDING, error)

    def mark_failed(self, sr_uid: str, owner: str, error: str) -> OutboxEntry:
        """A permanent failure (or retries exhausted): never retried automatically."""
        return self._finish(sr_uid, owner, OutboxState.FAILED, error)

    def for_study(self, study_uid: str, study_version: int | None = None) -> list[OutboxEntry]:
        table = db.outbox
        query = select(table).where(table.c.study_uid == study_uid).order_by(table.c.created_at)
        if study_version is not None:
            query = query.where(table.c.study_version == study_version)
        with db.transaction(self.engine, write=False) as conn:
            return [e for e in map(self._entry, conn.execute(query)) if e is not None]

    def undelivered(self, *, lease_s: float) -> list[OutboxEntry]:
        """Rows a restart must deliver: PENDING, and SENDING whose lease has expired (sender gone)."""
        table = db.outbox
        with db.transaction(self.engine, write=False) as conn:
            expired = table.c.claimed_at < db.now(conn) - lease_s
            query = (
                select(table)
                .where(
                    or_(
                        table.c.state == OutboxState.PENDING.value,
                        and_(table.c.state == OutboxState.SENDING.value, expired),
                    )
                )
                .order_by(table.c.created_at)
            )
            return [e for e in map(self._entry, conn.execute(query)) if e is not None]
