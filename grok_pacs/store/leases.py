"""Expired leases of unfinished work, for the reaper (grok_pacs.ingest.reaper): which studies and outbox results
no live worker is taking forward, and taking each one back exactly once even with several listeners reaping
one database.

A lease is measured on the database's clock from the row's last write (`updated_at`; a study's analysis
claim `claimed_at`): every step of a live job writes its row (QUEUED when published, ANALYSING when claimed,
DELIVERING/DONE/FAILED at the end; an outbox row at each claim and outcome), so a row untouched for a lease
longer than any job can run, plus its retries, belongs to a job that is gone (its message lost with the
broker, or its retries spent). On PostgreSQL an ANALYSING study is taken back only when no session holds its
analysis lock (`analyse_lock_key`, held by the job running the model): a live worker is never second-guessed.

Each row is re-checked under its lock (`FOR UPDATE SKIP LOCKED` on PostgreSQL: a row another reaper holds is
skipped; SQLite has one writer), its job published by the caller's `publish`, and its timestamp moved to now,
in one transaction: a publish that raises leaves the row as it was, for the next pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, and_, exists, func, not_, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from grok_pacs.store import db
from grok_pacs.store.records import StudyState

UNFINISHED = (StudyState.QUEUED, StudyState.ANALYSING, StudyState.DELIVERING)
FINISHED = (StudyState.DONE, StudyState.FAILED)
IN_FLIGHT = ("PENDING", "SENDING")  # outbox states (grok_pacs.store.outbox.OutboxState) not final yet
REQUEUED_DETAIL = "queued again: no worker finished it within its lease"


@dataclass(frozen=True)
class Reaped:
    """One job published again: a study's analysis (`sr_uid` empty) or one result's delivery."""

    study_uid: str
    version: int
    state: str  #: the row's state when it was taken back
    sr_uid: str = ""
    attempts: int = 0  #: delivery attempts so far (the delivery's retry number)


def analyse_lock_key(study_uid: str, version: int) -> ColumnElement[int]:
    """The PostgreSQL advisory lock key a job holds while it runs the model for (study, version)."""
    return func.hashtextextended(f"grok-pacs analyse {study_uid} v{version}", 0)


def oldest_unfinished_s(engine: Engine) -> float:
    """Seconds since the last instance of the oldest study that is neither DONE nor FAILED (0 when none)."""
    table = db.studies
    with db.transaction(engine, write=False) as conn:
        oldest = conn.execute(
            select(db.now(conn) - func.min(table.c.last_received_at)).where(
                table.c.state.not_in([state.value for state in FINISHED])
            )
        ).scalar()
    return max(0.0, float(oldest)) if oldest is not None else 0.0


def _results_in_flight(study: ColumnElement[str], version: ColumnElement[int]) -> ColumnElement[bool]:
    box = db.outbox
    return exists().where(box.c.study_uid == study, box.c.study_version == version, box.c.state.in_(IN_FLIGHT))


def _stale_study(conn: Connection, lease_s: float) -> ColumnElement[bool]:
    """Unfinished, untouched for `lease_s`; DELIVERING only when no result is in flight (those are reaped as
    results: publishing the analysis again would restart their retry count)."""
    table = db.studies
    expired = table.c.updated_at < db.now(conn) - lease_s
    delivering = table.c.state == StudyState.DELIVERING.value
    return and_(
        table.c.state.in_([state.value for state in UNFINISHED]),
        table.c.version > 0,
        expired,
        or_(not_(delivering), not_(_results_in_flight(table.c.study_uid, table.c.version))),
    )


def _analysis_held(conn: Connection, study_uid: str, version: int) -> bool:
    """Whether a live job holds the analysis lock (PostgreSQL); a transaction lock of ours, if we get it, goes
    at commit. SQLite (one box): the lease alone decides."""
    if db.is_sqlite(conn):
        return False
    return not conn.execute(select(func.pg_try_advisory_xact_lock(analyse_lock_key(study_uid, version)))).scalar()


def requeue_studies(
    engine: Engine, lease_s: float, publish: Callable[[str, int], object], limit: int = 100
) -> list[Reaped]:
    """Publish again the analysis of each study whose lease expired (at most `limit` per call); an ANALYSING
    one goes back to QUEUED (any job may claim it), and each one's `updated_at` starts a new lease."""
    table, reaped = db.studies, []
    with db.transaction(engine, write=False) as conn:
        query = select(table.c.study_uid).where(_stale_study(conn, lease_s)).order_by(table.c.updated_at).limit(limit)
        candidates = list(conn.execute(query).scalars())
    for study_uid in candidates:
        with db.transaction(engine) as conn:
            row = conn.execute(
                select(table.c.version, table.c.state)
                .where(table.c.study_uid == study_uid, _stale_study(conn, lease_s))
                .with_for_update(skip_locked=True)
            ).first()
            if row is None or (
                row.state == StudyState.ANALYSING.value and _analysis_held(conn, study_uid, row.version)
            ):
                continue  # taken forward meanwhile, held by another reaper, or a live worker runs it
            publish(study_uid, row.version)
            values = {"updated_at": db.now(conn)}
            if row.state == StudyState.ANALYSING.value:
                values |= {"state": StudyState.QUEUED.value, "claimed_by": "", "detail": REQUEUED_DETAIL}
            conn.execute(update(table).where(table.c.study_uid == study_uid).values(**values))
        reaped.append(Reaped(study_uid, row.version, row.state))
    return reaped


def _stale_result(conn: Connection, lease_s: float, pending_grace_s: float) -> ColumnElement[bool]:
    """A result of a DELIVERING study (its study's current version) that no delivery job takes forward: PENDING
    for longer than its next retry's wait plus the lease, or SENDING with a claim older than the lease."""
    box, table = db.outbox, db.studies
    now = db.now(conn)
    pending = and_(box.c.state == "PENDING", box.c.updated_at < now - pending_grace_s - lease_s)
    sending = and_(box.c.state == "SENDING", box.c.claimed_at < now - lease_s)
    delivering = exists().where(
        table.c.study_uid == box.c.study_uid,
        table.c.version == box.c.study_version,
        table.c.state == StudyState.DELIVERING.value,
    )
    return and_(or_(pending, sending), delivering)


def requeue_results(
    engine: Engine,
    lease_s: float,
    pending_grace_s: float,
    publish: Callable[[str, int], object],
    limit: int = 100,
) -> list[Reaped]:
    """Publish again the delivery of each stale result (`publish(sr_uid, attempts)`), at most `limit` per call;
    a SENDING one (its sender gone) goes back to PENDING, and each one's `updated_at` starts a new lease."""
    box, reaped = db.outbox, []
    with db.transaction(engine, write=False) as conn:
        candidates = list(
            conn.execute(
                select(box.c.sr_uid)
                .where(_stale_result(conn, lease_s, pending_grace_s))
                .order_by(box.c.updated_at)
                .limit(limit)
            ).scalars()
        )
    for sr_uid in candidates:
        with db.transaction(engine) as conn:
            row = conn.execute(
                select(box.c.study_uid, box.c.study_version, box.c.state, box.c.attempts)
                .where(box.c.sr_uid == sr_uid, _stale_result(conn, lease_s, pending_grace_s))
                .with_for_update(skip_locked=True)
            ).first()
            if row is None:
                continue
            publish(sr_uid, row.attempts)
            conn.execute(
                update(box)
                .where(box.c.sr_uid == sr_uid)
                .values(state="PENDING", claimed_by="", updated_at=db.now(conn))
            )
        reaped.append(Reaped(row.study_uid, row.study_version, row.state, sr_uid, row.attempts))
    return reaped
