"""Durable outbox of result instances waiting for delivery: one row per SOP Instance UID in the index
SQLite file. A result is an eye's SR (`kind` SR) or the study's PDF report (`kind` PDF, eye empty); the
column keeps its historical name `sr_uid`.

The row is the delivery's state machine, so that a result survives worker restarts and is sent to the PACS
at most once per claim:

    PENDING --claim--> SENDING --stored--> DELIVERED          (terminal)
       ^                 |  \\--permanent--> FAILED            (terminal)
       +---transient-----+
    SENDING whose claim is older than its lease (the sender died) may be claimed again.

The SR's SOP Instance UID is the primary key: a re-run of the same (study, version, bundle, eye) finds
the same row; a DELIVERED row is never sent again.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from grok_pacs.store.index import open_connection

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    sr_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    study_version INTEGER NOT NULL,
    bundle_version TEXT NOT NULL,
    eye TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    claimed_by TEXT NOT NULL DEFAULT '',
    claimed_at REAL,
    destination TEXT NOT NULL DEFAULT '',
    note TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    delivered_at REAL,
    kind TEXT NOT NULL DEFAULT 'SR'
);
CREATE INDEX IF NOT EXISTS outbox_study ON outbox(study_uid, study_version);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox(state);
"""


#: Added after the first release: an outbox created before it gets the column (every old row is an SR).
_ADD_KIND = "ALTER TABLE outbox ADD COLUMN kind TEXT NOT NULL DEFAULT 'SR'"


class ResultKind(StrEnum):
    SR = "SR"  #: one eye's DICOM SR
    PDF = "PDF"  #: the study's Encapsulated PDF report


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
    path: str  #: relative to the data directory
    note: str = ""
    kind: ResultKind = ResultKind.SR


class OutboxError(RuntimeError):
    """An outbox operation on a row that is not in the state it needs (names the row and state)."""


class Outbox:
    """The outbox table; every call opens a short transaction, so several processes can share it."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = Path(db_path)
        db = open_connection(self.db_path)
        try:
            db.executescript(SCHEMA)
            if "kind" not in {row[1] for row in db.execute("PRAGMA table_info(outbox)")}:
                try:
                    db.execute(_ADD_KIND)
                except sqlite3.OperationalError as exc:  # another process added it between our two lines
                    if "duplicate column" not in str(exc):
                        raise
        finally:
            db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A BEGIN IMMEDIATE transaction: claims are atomic across processes."""
        db = open_connection(self.db_path)  # WAL, synchronous=FULL, busy timeout: same as the index
        try:
            db.row_factory = sqlite3.Row
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    @staticmethod
    def _entry(row: sqlite3.Row | None) -> OutboxEntry | None:
        if row is None:
            return None
        values = dict(row)
        values["state"] = OutboxState(values["state"])
        values["kind"] = ResultKind(values["kind"])
        return OutboxEntry(**values)

    def _get(self, db: sqlite3.Connection, sr_uid: str) -> OutboxEntry | None:
        return self._entry(db.execute("SELECT * FROM outbox WHERE sr_uid = ?", (sr_uid,)).fetchone())

    def get(self, sr_uid: str) -> OutboxEntry | None:
        with self._tx() as db:
            return self._get(db, sr_uid)

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

    def put_many(self, rows: list[OutboxRow]) -> list[OutboxEntry]:
        """`put` for several results in ONE transaction: a study run's SRs and PDF appear together or not
        at all, so a crash never leaves some of them queued and the others unmade."""
        now = time.time()
        entries = []
        with self._tx() as db:
            for row in rows:
                current = self._get(db, row.sr_uid)
                if current is None:
                    db.execute(
                        "INSERT INTO outbox (sr_uid, study_uid, study_version, bundle_version, eye, path, state,"
                        " note, created_at, updated_at, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            row.sr_uid,
                            row.study_uid,
                            row.study_version,
                            row.bundle_version,
                            row.eye,
                            row.path,
                            OutboxState.PENDING,
                            row.note,
                            now,
                            now,
                            ResultKind(row.kind),
                        ),
                    )
                elif current.state is OutboxState.PENDING:
                    db.execute(
                        "UPDATE outbox SET path = ?, state = ?, last_error = '', note = ?, updated_at = ?"
                        " WHERE sr_uid = ?",
                        (row.path, OutboxState.PENDING, row.note, now, row.sr_uid),
                    )
                entry = self._get(db, row.sr_uid)
                assert entry is not None
                entries.append(entry)
        return entries

    def claim(self, sr_uid: str, owner: str, *, lease_s: float) -> OutboxEntry | None:
        """Take the row for sending: PENDING, or SENDING by the same owner or with an expired lease.

        Returns the claimed entry, or None when the row is DELIVERED, FAILED or sent by someone else now.
        Raises OutboxError when no such SR is in the outbox.
        """
        now = time.time()
        with self._tx() as db:
            current = self._get(db, sr_uid)
            if current is None:
                raise OutboxError(f"SR {sr_uid} is not in the outbox")
            sending_free = current.state is OutboxState.SENDING and (
                current.claimed_by == owner or (current.claimed_at or 0.0) < now - lease_s
            )
            if current.state is not OutboxState.PENDING and not sending_free:
                return None
            db.execute(
                "UPDATE outbox SET state = ?, claimed_by = ?, claimed_at = ?, attempts = attempts + 1,"
                " updated_at = ? WHERE sr_uid = ?",
                (OutboxState.SENDING, owner, now, now, sr_uid),
            )
            return self._get(db, sr_uid)

    def _finish(self, sr_uid: str, owner: str, state: OutboxState, error: str, destination: str = "") -> OutboxEntry:
        now = time.time()
        with self._tx() as db:
            current = self._get(db, sr_uid)
            if current is None or current.state is not OutboxState.SENDING or current.claimed_by != owner:
                found = "missing" if current is None else f"{current.state} by {current.claimed_by!r}"
                raise OutboxError(f"SR {sr_uid}: expected SENDING by {owner!r}, found {found}")
            db.execute(
                "UPDATE outbox SET state = ?, last_error = ?, destination = ?, updated_at = ?, claimed_by = '',"
                " delivered_at = ? WHERE sr_uid = ?",
                (state, error, destination, now, now if state is OutboxState.DELIVERED else None, sr_uid),
            )
            entry = self._get(db, sr_uid)
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
        with self._tx() as db:
            if study_version is None:
                rows = db.execute("SELECT * FROM outbox WHERE study_uid = ? ORDER BY created_at", (study_uid,))
            else:
                rows = db.execute(
                    "SELECT * FROM outbox WHERE study_uid = ? AND study_version = ? ORDER BY created_at",
                    (study_uid, study_version),
                )
            return [e for e in map(self._entry, rows.fetchall()) if e is not None]

    def undelivered(self, *, lease_s: float) -> list[OutboxEntry]:
        """Rows a restart must deliver: PENDING, and SENDING whose lease has expired (sender gone)."""
        cutoff = time.time() - lease_s
        with self._tx() as db:
            rows = db.execute(
                "SELECT * FROM outbox WHERE state = ? OR (state = ? AND claimed_at < ?) ORDER BY created_at",
                (OutboxState.PENDING, OutboxState.SENDING, cutoff),
            ).fetchall()
            return [e for e in map(self._entry, rows) if e is not None]
