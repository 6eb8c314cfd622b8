"""The durable study index: every stored instance and the state of every study, in SQLite.

One file (`settings.index_path`), WAL journal with `synchronous=FULL`, so a committed row survives a
crash and readers (CLI, worker) never block the listener. Other modules may add their own tables to the
same file through `open_connection()`.

Study versions: a study is queued as version 1 when it first goes quiet. An instance that arrives
after that puts the study back into RECEIVING, and assembly queues it again as version N+1. A job for
an older version finds the study's version moved on; `set_state(..., version=v)` then changes nothing.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

BUSY_TIMEOUT_MS = 30_000


class StudyState(StrEnum):
    RECEIVING = "RECEIVING"  # instances arriving; not yet quiet for the quiet period
    QUEUED = "QUEUED"  # job (study_uid, version) is on the broker
    ANALYSING = "ANALYSING"  # a worker runs the model
    DELIVERING = "DELIVERING"  # SR built, being sent to the destination
    DONE = "DONE"
    FAILED = "FAILED"


@dataclass(frozen=True)
class InstanceRecord:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    laterality: str  # 'R', 'L', 'B' or ''
    frames: int
    size: int  # bytes of the stored file
    path: str  # relative to the data directory, e.g. incoming/<study>/<series>/<sop>.dcm
    received_at: float  # UNIX time
    calling_ae: str
    acquisition_datetime: str  # DICOM DT, '' if the instance has none
    transfer_syntax: str


@dataclass(frozen=True)
class StudyRecord:
    study_uid: str
    state: StudyState
    version: int  # last version queued (0: never queued)
    detail: str
    instance_count: int
    first_received_at: float
    last_received_at: float


@dataclass(frozen=True)
class StoredStudy:
    """A study row and its instances, read in one transaction (a job's snapshot of the index)."""

    study: StudyRecord
    instances: tuple[InstanceRecord, ...]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    modality TEXT NOT NULL,
    laterality TEXT NOT NULL,
    frames INTEGER NOT NULL,
    size INTEGER NOT NULL,
    path TEXT NOT NULL,
    received_at REAL NOT NULL,
    calling_ae TEXT NOT NULL,
    acquisition_datetime TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    detail TEXT NOT NULL DEFAULT '',
    instance_count INTEGER NOT NULL DEFAULT 0,
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS studies_by_state ON studies(state, last_received_at);
"""

_INSTANCE_FIELDS = [field.name for field in dataclasses.fields(InstanceRecord)]
_STUDY_FIELDS = [field.name for field in dataclasses.fields(StudyRecord)]


def open_connection(path: Path) -> sqlite3.Connection:
    """A connection to the index file with the project's pragmas (WAL, full sync, busy timeout)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return conn


def _study(row: tuple) -> StudyRecord:
    values = dict(zip(_STUDY_FIELDS, row))
    values["state"] = StudyState(values["state"])
    return StudyRecord(**values)


class StudyIndex:
    """Thread-safe access to the index: one connection, serialised by a lock (SQLite has one writer)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._conn = open_connection(self.path)
        with self._lock:
            self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def add_instance(self, rec: InstanceRecord) -> bool:
        """Record a durable instance; False (and no change) when its SOP Instance UID is already known.

        A new instance puts its study into RECEIVING (creating it if needed), so that assembly queues it
        once it is quiet again, as a new version when it had been queued before.
        """
        return self.add_instances([rec])[0]

    def add_instances(self, records: list[InstanceRecord]) -> list[bool]:
        """`add_instance` for each record in ONE transaction (one commit, one fsync): all or none."""
        with self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            return [self._add(rec) for rec in records]

    def _add(self, rec: InstanceRecord) -> bool:
        placeholders = ",".join("?" for _ in _INSTANCE_FIELDS)
        cursor = self._conn.execute(
            f"INSERT OR IGNORE INTO instances ({','.join(_INSTANCE_FIELDS)}) VALUES ({placeholders})",
            dataclasses.astuple(rec),
        )
        if cursor.rowcount == 0:
            return False
        self._conn.execute(
            """INSERT INTO studies (study_uid, state, version, detail, instance_count,
                                    first_received_at, last_received_at, updated_at)
               VALUES (?, ?, 0, '', 1, ?, ?, ?)
               ON CONFLICT(study_uid) DO UPDATE SET
                   state = excluded.state, detail = '',
                   instance_count = instance_count + 1,
                   first_received_at = MIN(first_received_at, excluded.first_received_at),
                   last_received_at = MAX(last_received_at, excluded.last_received_at),
                   updated_at = excluded.updated_at""",
            (rec.study_uid, StudyState.RECEIVING.value, rec.received_at, rec.received_at, time.time()),
        )
        return True

    def has_instance(self, sop_uid: str) -> bool:
        with self._lock:
            row = self._conn.execute("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()
        return row is not None

    def instance_paths(self) -> set[str]:
        """Relative paths of every indexed instance (recovery compares them with the disk)."""
        with self._lock:
            return {row[0] for row in self._conn.execute("SELECT path FROM instances")}

    def forget_paths(self, paths: set[str]) -> int:
        """Drop instances whose file is gone (recovery: never acknowledged); recount their studies."""
        if not paths:
            return 0
        with self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            studies: dict[str, int] = {}
            for path in paths:
                row = self._conn.execute("DELETE FROM instances WHERE path = ? RETURNING study_uid", (path,)).fetchone()
                if row is not None:
                    studies[row[0]] = studies.get(row[0], 0) + 1
            for study_uid in studies:
                self._conn.execute(
                    "UPDATE studies SET instance_count = (SELECT COUNT(*) FROM instances WHERE study_uid = ?), "
                    "updated_at = ? WHERE study_uid = ?",
                    (study_uid, time.time(), study_uid),
                )
                self._conn.execute("DELETE FROM studies WHERE study_uid = ? AND instance_count = 0", (study_uid,))
            return sum(studies.values())

    def _select_instances(self, study_uid: str) -> list[InstanceRecord]:
        rows = self._conn.execute(
            f"SELECT {','.join(_INSTANCE_FIELDS)} FROM instances WHERE study_uid = ? "
            "ORDER BY series_uid, received_at, sop_uid",
            (study_uid,),
        ).fetchall()
        return [InstanceRecord(*row) for row in rows]

    def _select_study(self, study_uid: str) -> StudyRecord | None:
        row = self._conn.execute(
            f"SELECT {','.join(_STUDY_FIELDS)} FROM studies WHERE study_uid = ?", (study_uid,)
        ).fetchone()
        return None if row is None else _study(row)

    def instances(self, study_uid: str) -> list[InstanceRecord]:
        with self._lock:
            return self._select_instances(study_uid)

    def study(self, study_uid: str) -> StudyRecord | None:
        with self._lock:
            return self._select_study(study_uid)

    def read_study(self, study_uid: str) -> StoredStudy | None:
        """The study and its instances as of one moment (one read transaction); None if unknown."""
        with self._lock:
            self._conn.execute("BEGIN")  # WAL: both SELECTs see the same committed state
            try:
                study = self._select_study(study_uid)
                instances = tuple(self._select_instances(study_uid)) if study is not None else ()
            finally:
                self._conn.execute("COMMIT")
        return None if study is None else StoredStudy(study, instances)

    def studies(self) -> list[StudyRecord]:
        """All studies, most recently received first."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {','.join(_STUDY_FIELDS)} FROM studies ORDER BY last_received_at DESC"
            ).fetchall()
        return [_study(row) for row in rows]

    def count_by_state(self) -> dict[str, int]:
        """Number of studies in each state, every state present (for the grok_pacs_studies gauge)."""
        with self._lock:
            rows = self._conn.execute("SELECT state, COUNT(*) FROM studies GROUP BY state").fetchall()
        counts = {state.value: 0 for state in StudyState}
        counts.update({state: count for state, count in rows})
        return counts

    def due_studies(self, cutoff: float) -> list[StudyRecord]:
        """RECEIVING studies whose last instance arrived at or before `cutoff` (complete, not queued)."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {','.join(_STUDY_FIELDS)} FROM studies WHERE state = ? AND last_received_at <= ? "
                "ORDER BY last_received_at",
                (StudyState.RECEIVING.value, cutoff),
            ).fetchall()
        return [_study(row) for row in rows]

    def mark_queued(self, study_uid: str, version: int, last_received_at: float) -> bool:
        """RECEIVING -> QUEUED at `version`, only if no instance arrived since `last_received_at`."""
        with self._lock, self._conn:
            cursor = self._conn.execute(
                "UPDATE studies SET state = ?, version = ?, detail = '', updated_at = ? "
                "WHERE study_uid = ? AND state = ? AND version = ? AND last_received_at = ?",
                (
                    StudyState.QUEUED.value,
                    version,
                    time.time(),
                    study_uid,
                    StudyState.RECEIVING.value,
                    version - 1,
                    last_received_at,
                ),
            )
            return cursor.rowcount == 1

    def set_state(self, study_uid: str, state: StudyState, detail: str = "", version: int | None = None) -> bool:
        """Set a study's state; True if it changed.

        With `version`, the change applies only while the study is still at that version and has not
        received new instances since (state RECEIVING): a job for an outdated version changes nothing.
        """
        query = "UPDATE studies SET state = ?, detail = ?, updated_at = ? WHERE study_uid = ?"
        params: list[object] = [StudyState(state).value, detail, time.time(), study_uid]
        if version is not None:
            query += " AND version = ? AND state != ?"
            params += [version, StudyState.RECEIVING.value]
        with self._lock, self._conn:
            return self._conn.execute(query, params).rowcount == 1
