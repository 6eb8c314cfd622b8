"""The durable study index: every stored instance and the state of every study (tables in `db`).

Embedded, one SQLite file (`settings.index_path`, WAL, `synchronous=FULL`): a committed row survives a
crash and readers (CLI, worker) never block the listener. On a server, PostgreSQL (`database_url`).

Study versions: a study is queued as version 1 when it first goes quiet. An instance that arrives
after that puts the study back into RECEIVING, and assembly queues it again as version N+1. A job for
an older version finds the study's version moved on; `set_state(..., version=v)` then changes nothing.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy import Engine, and_, delete, func, literal, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import ResourceClosedError

from grok_pacs.store import db, leases, schema
from grok_pacs.store.records import (
    INSTANCE_COLUMNS,
    INSTANCE_FIELDS,
    STUDY_COLUMNS,
    insert_instance,
    study_from_row,
    upsert_study,
)
from grok_pacs.store.records import InstanceRecord as InstanceRecord  # re-exported: importers keep this path
from grok_pacs.store.records import StoredStudy as StoredStudy
from grok_pacs.store.records import StudyRecord as StudyRecord
from grok_pacs.store.records import StudyState as StudyState


class StudyIndex:
    """Thread-safe access to the index tables; every call is one short transaction.

    `target` is a database URL, an SQLite file path (the embedded index) or an engine to share. On SQLite
    this process's writes take a lock first: SQLite has one writer, and waiting on a lock is cheaper than
    SQLite's busy-retry sleeps. `node_id` (Settings.node_id) is recorded with each instance added here
    and scopes recovery (`instance_paths`, `forget_paths`) to this node's rows (`db.received_here`).
    """

    def __init__(self, target: str | Path | Engine, node_id: str = "") -> None:
        self.node_id = node_id
        self._owns_engine = not isinstance(target, Engine)
        self._closed = False
        self.engine = db.open_engine(target) if not isinstance(target, Engine) else target
        self._write_lock = threading.Lock() if db.is_sqlite(self.engine) else contextlib.nullcontext()
        schema.open_schema(self.engine)
        # Built once: the listener adds one row per instance, and building them costs more than running them.
        self._insert_instance = insert_instance(self.engine)
        self._upsert_study = upsert_study(self.engine)

    def close(self) -> None:
        """Release the connections; any later call raises (a DatabaseError), never reopens silently."""
        self._closed = True
        if self._owns_engine:
            self.engine.dispose()

    def _check_open(self) -> None:
        if self._closed:
            raise ResourceClosedError("the study index is closed")

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        self._check_open()
        with db.transaction(self.engine, write=False) as conn:
            yield conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        self._check_open()
        with self._write_lock, db.transaction(self.engine) as conn:
            yield conn

    def add_instance(self, rec: InstanceRecord) -> bool:
        """Record a durable instance; False (and no change) when its SOP Instance UID is already known.

        A new instance puts its study into RECEIVING (creating it if needed), so that assembly queues it
        once it is quiet again, as a new version when it had been queued before.
        """
        return self.add_instances([rec])[0]

    def add_instances(self, records: list[InstanceRecord]) -> list[bool]:
        """`add_instance` for each record in ONE transaction (one commit, one fsync): all or none."""
        with self._write() as conn:
            return [self._add(conn, rec) for rec in records]

    def _add(self, conn: Connection, rec: InstanceRecord) -> bool:
        params = {name: getattr(rec, name) for name in INSTANCE_FIELDS}
        params["now"] = time.time()  # the clock of SQLite (PostgreSQL reads its own)
        params["received_by"] = self.node_id
        if conn.execute(self._insert_instance, params).first() is None:  # known already
            return False
        conn.execute(self._upsert_study, params)
        return True

    def has_instance(self, sop_uid: str) -> bool:
        with self._read() as conn:
            row = conn.execute(select(literal(1)).where(db.instances.c.sop_uid == str(sop_uid))).first()
        return row is not None

    def instance_paths(self) -> set[str]:
        """Relative paths of the instances this node received (recovery compares them with its disk)."""
        with self._read() as conn:
            query = select(db.instances.c.path).where(db.received_here(conn, self.node_id))
            return set(conn.execute(query).scalars())

    def forget_paths(self, paths: set[str]) -> int:
        """Drop instances of this node whose file is gone (recovery: never acknowledged); recount their
        studies. Another listener's rows are never dropped: its file is on its own disk."""
        if not paths:
            return 0
        inst, table = db.instances, db.studies
        with self._write() as conn:
            counts: dict[str, int] = {}
            for path in paths:
                mine = and_(inst.c.path == path, db.received_here(conn, self.node_id))
                gone = conn.execute(delete(inst).where(mine).returning(inst.c.study_uid)).scalars()
                for study_uid in gone:
                    counts[study_uid] = counts.get(study_uid, 0) + 1
            for study_uid in counts:
                remaining = select(func.count()).select_from(inst).where(inst.c.study_uid == study_uid)
                conn.execute(
                    update(table)
                    .where(table.c.study_uid == study_uid)
                    .values(instance_count=remaining.scalar_subquery(), updated_at=db.now(conn))
                )
                conn.execute(delete(table).where(table.c.study_uid == study_uid, table.c.instance_count == 0))
            return sum(counts.values())

    @staticmethod
    def _select_instances(conn: Connection, study_uid: str) -> list[InstanceRecord]:
        inst = db.instances
        rows = conn.execute(
            select(*INSTANCE_COLUMNS)
            .where(inst.c.study_uid == study_uid)
            .order_by(inst.c.series_uid, inst.c.received_at, inst.c.sop_uid)
        )
        return [InstanceRecord(*row) for row in rows]

    @staticmethod
    def _select_study(conn: Connection, study_uid: str) -> StudyRecord | None:
        row = conn.execute(select(*STUDY_COLUMNS).where(db.studies.c.study_uid == study_uid)).first()
        return None if row is None else study_from_row(row)

    def instances(self, study_uid: str) -> list[InstanceRecord]:
        with self._read() as conn:
            return self._select_instances(conn, str(study_uid))  # str: not pydicom's UID (a str subclass)

    def study(self, study_uid: str) -> StudyRecord | None:
        with self._read() as conn:
            return self._select_study(conn, str(study_uid))

    def read_study(self, study_uid: str) -> StoredStudy | None:
        """The study and its instances as of one moment (one read transaction); None if unknown."""
        with self._read() as conn:  # both SELECTs see one snapshot
            study = self._select_study(conn, study_uid)
            instances = tuple(self._select_instances(conn, study_uid)) if study is not None else ()
        return None if study is None else StoredStudy(study, instances)

    def studies(self) -> list[StudyRecord]:
        """All studies, most recently received first."""
        with self._read() as conn:
            rows = conn.execute(select(*STUDY_COLUMNS).order_by(db.studies.c.last_received_at.desc())).all()
        return [study_from_row(row) for row in rows]

    def count_by_state(self) -> dict[str, int]:
        """Number of studies in each state, every state present (for the grok_pacs_studies gauge)."""
        table = db.studies
        with self._read() as conn:
            rows = conn.execute(select(table.c.state, func.count()).group_by(table.c.state)).all()
        counts = {state.value: 0 for state in StudyState}
        counts.update({state: count for state, count in rows})
        return counts

    def due_studies(self, cutoff: float) -> list[StudyRecord]:
        """RECEIVING studies whose last instance arrived at or before `cutoff` (complete, not queued)."""
        table = db.studies
        with self._read() as conn:
            rows = conn.execute(
                select(*STUDY_COLUMNS)
                .where(table.c.state == StudyState.RECEIVING.value, table.c.last_received_at <= cutoff)
                .order_by(table.c.last_received_at)
            ).all()
        return [study_from_row(row) for row in rows]

    def quiet_studies(self, quiet_period: float) -> list[StudyRecord]:
        """RECEIVING studies without a new instance for `quiet_period` s, measured on the database's clock
        (the time of each study's last write), so listeners on several hosts agree on when it is quiet."""
        table = db.studies
        with self._read() as conn:
            rows = conn.execute(
                select(*STUDY_COLUMNS)
                .where(
                    table.c.state == StudyState.RECEIVING.value,
                    table.c.updated_at <= db.now(conn) - quiet_period,
                )
                .order_by(table.c.last_received_at)
            ).all()
        return [study_from_row(row) for row in rows]

    def queue_quiet(
        self,
        quiet_period: float,
        publish: Callable[[StudyRecord, int], str],
        *,
        cutoff: float | None = None,
        held: Callable[[], set[str]] | None = None,
    ) -> list[tuple[StudyRecord, int, str]]:
        """Queue each quiet RECEIVING study once, even with several listeners sweeping one database.

        Per study one transaction: lock its row (`FOR UPDATE SKIP LOCKED` on PostgreSQL: a study another
        sweeper holds is skipped; SQLite has one writer), check it is still RECEIVING and quiet, publish
        its job (`publish(study, version)` -> task id), record QUEUED at that version. A publish that
        raises rolls the study back to RECEIVING, for the next pass. `cutoff` (host time): due when the
        last instance arrived at or before it, instead of `quiet_period` on the database's clock. `held()`
        names quiet studies that are not complete yet (read after the quiet ones: an instance arriving in
        between makes its study not quiet at the locked re-check).
        Returns [(study as it was, version queued, task id)].
        """
        table, queued = db.studies, []
        due = self.quiet_studies(quiet_period) if cutoff is None else self.due_studies(cutoff)
        waiting = held() if due and held is not None else set()
        for candidate in (study for study in due if study.study_uid not in waiting):
            with self._write() as conn:
                quiet = table.c.updated_at <= db.now(conn) - quiet_period
                row = conn.execute(
                    select(*STUDY_COLUMNS)
                    .where(
                        table.c.study_uid == candidate.study_uid,
                        table.c.state == StudyState.RECEIVING.value,
                        quiet if cutoff is None else table.c.last_received_at <= cutoff,
                    )
                    .with_for_update(skip_locked=True)
                ).first()
                if row is None:  # queued by another listener meanwhile, or grew: not quiet any more
                    continue
                study = study_from_row(row)
                task_id = publish(study, study.version + 1)
                conn.execute(
                    update(table)
                    .where(table.c.study_uid == study.study_uid)
                    .values(
                        state=StudyState.QUEUED.value, version=study.version + 1, detail="", updated_at=db.now(conn)
                    )
                )
            queued.append((study, study.version + 1, task_id))
        return queued

    @contextlib.contextmanager
    def analysing(
        self, study_uid: str, version: int, owner: str, *, lease_s: float, detail: str = ""
    ) -> Iterator[bool]:
        """Claim `version` of the study for running the model, for the length of the block: True for the
        one job that may run it, False for a duplicate (it must not).

        Job ids are per (study, version), so the owner cannot tell a duplicate from a redelivery. On
        PostgreSQL a session advisory lock held through the block tells them apart: it is free only when
        no live job holds it (a worker that dies loses its session, hence the lock), so its holder takes
        the claim over from any owner. On SQLite (one box) the claim is `claim_study` alone.
        """
        if db.is_sqlite(self.engine):
            yield self.claim_study(study_uid, version, owner, lease_s=lease_s, detail=detail)
            return
        self._check_open()
        key = leases.analyse_lock_key(study_uid, version)  # the reaper checks the same lock
        with self.engine.connect() as conn:
            # A worker host that vanishes (power, network) sends no FIN: the server's keepalive must notice
            # within ~90 s (its default is 2 h), long before the broker redelivers the job to another host.
            for setting, value in (("idle", 60), ("interval", 10), ("count", 3)):
                conn.exec_driver_sql(f"SET tcp_keepalives_{setting} = {value}")
            locked = bool(conn.execute(select(func.pg_try_advisory_lock(key))).scalar())
            conn.commit()
            try:
                yield locked and self.claim_study(study_uid, version, owner, lease_s=0.0, detail=detail)
            finally:
                if locked:
                    conn.rollback()
                    conn.execute(select(func.pg_advisory_unlock(key)))
                    conn.commit()

    def claim_study(self, study_uid: str, version: int, owner: str, *, lease_s: float, detail: str = "") -> bool:
        """QUEUED -> ANALYSING for `version`, in one conditional UPDATE: True for the one job that may run
        the model. ANALYSING by the same `owner` (its redelivered job) or with a claim older than `lease_s`
        (database time: its worker died) may be claimed again; a duplicate job for the version gets False."""
        table = db.studies
        with self._write() as conn:
            stamp = db.now(conn)
            analysing = and_(
                table.c.state == StudyState.ANALYSING.value,
                or_(table.c.claimed_by == owner, table.c.claimed_at < stamp - lease_s),
            )
            query = (
                update(table)
                .where(
                    table.c.study_uid == study_uid,
                    table.c.version == version,
                    or_(table.c.state == StudyState.QUEUED.value, analysing),
                )
                .values(
                    state=StudyState.ANALYSING.value,
                    detail=detail,
                    claimed_by=owner,
                    claimed_at=stamp,
                    updated_at=stamp,
                )
                .returning(table.c.study_uid)
            )
            return conn.execute(query).first() is not None

    def mark_queued(self, study_uid: str, version: int, last_received_at: float) -> bool:
        """RECEIVING -> QUEUED at `version`, only if no instance arrived since `last_received_at`."""
        table = db.studies
        with self._write() as conn:
            return (
                conn.execute(
                    update(table)
                    .where(
                        table.c.study_uid == study_uid,
                        table.c.state == StudyState.RECEIVING.value,
                        table.c.version == version - 1,
                        table.c.last_received_at == last_received_at,
                    )
                    .values(state=StudyState.QUEUED.value, version=version, detail="", updated_at=db.now(conn))
                ).rowcount
                == 1
            )

    def set_state(self, study_uid: str, state: StudyState, detail: str = "", version: int | None = None) -> bool:
        """Set a study's state; True if it changed.

        With `version`, the change applies only while the study is still at that version and has not
        received new instances since (state RECEIVING): a job for an outdated version changes nothing.
        """
        table = db.studies
        with self._write() as conn:
            query = (
                update(table)
                .where(table.c.study_uid == study_uid)
                .values(state=StudyState(state).value, detail=detail, updated_at=db.now(conn))
            )
            if version is not None:
                query = query.where(table.c.version == version, table.c.state != StudyState.RECEIVING.value)
            return conn.execute(query).rowcount == 1
