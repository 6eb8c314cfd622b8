"""The results register: one row per eye's AI result (its SR's SOP Instance UID, table `results`) and what
became of it after the pipeline queued it, for the clinicians' worklist, withdrawal and drift reports.

    PENDING --SR stored at the PACS--> DELIVERED --clinician--> REVIEWED
       |  \\                              |   \\
       |   +--a later study version-------+----+--> REPLACED   (a rejection note queued for it)
       +------`grok-pacs withdraw`--------+------> WITHDRAWN  (also from REVIEWED)

Every transition is one conditional UPDATE, so two processes acting on a result at once never both win,
and a re-run of a transition already made changes nothing. Rows are added idempotently: a re-run of the
same study job keeps the row (and its state) it made the first time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import ColumnElement

from grok_pacs.store import db, schema


class ResultState(StrEnum):
    PENDING = "PENDING"  #: queued in the outbox, not yet at the PACS
    DELIVERED = "DELIVERED"  #: the AI SR is at the PACS, awaiting review
    REPLACED = "REPLACED"  #: a later study version's result replaced it (rejection note queued/sent)
    WITHDRAWN = "WITHDRAWN"  #: an administrator withdrew it (`grok-pacs withdraw`; rejection note queued/sent)
    REVIEWED = "REVIEWED"  #: a clinician accepted, rejected or corrected it


class ReviewOutcome(StrEnum):
    ACCEPTED = "ACCEPTED"
    REJECTED = "REJECTED"
    CORRECTED = "CORRECTED"


#: The results that stand at the PACS (a withdrawal acts on these).
CURRENT = (ResultState.PENDING, ResultState.DELIVERED, ResultState.REVIEWED)
#: The results a later study version replaces (a reviewed one keeps the clinician's verdict).
REPLACEABLE = (ResultState.PENDING, ResultState.DELIVERED)
WITHDRAW_REASONS = ("quality", "safety", "replaced")


@dataclass(frozen=True)
class ResultRecord:
    """One eye's AI result. Construct with the first 12 fields; the rest is the register's to change."""

    sr_uid: str
    study_uid: str
    study_version: int
    bundle_version: str
    eye: str  #: "R" / "L"
    label: str  #: the stated label's value, "Indeterminate", or "" (ungradable: no diagnosis)
    probability: float | None  #: the stated/top label's calibrated probability; None when ungradable
    disposition: str  #: the eye's disposition text as the SR states it
    gradability: str  #: the report's Gradability value ("gradable" / "ungradable")
    pdf_uid: str  #: the study's PDF report SOP Instance UID ("" when none)
    cfp_uid: str  #: SOP Instance UID of the colour fundus photo the eye's report used ("" when absent)
    oct_uid: str  #: SOP Instance UID of the OCT the eye's report used ("" when absent)
    state: ResultState = ResultState.PENDING
    created_at: float = 0.0
    updated_at: float = 0.0
    delivered_at: float | None = None
    replaced_by: str = ""  #: sr_uid of the replacing result ("" unless REPLACED)
    withdraw_reason: str = ""  #: "quality" / "safety" / "replaced" ("" otherwise)
    rejection_uid: str = ""  #: SOP Instance UID of the KOS rejection note queued for it
    review_outcome: str = ""
    reviewed_label: str = ""
    reviewer: str = ""
    review_note: str = ""
    reviewed_at: float | None = None
    verified_uid: str = ""  #: the clinician-verified SR sent for an ACCEPTED/CORRECTED review

    def __post_init__(self) -> None:
        if not self.sr_uid or not self.study_uid:
            raise ValueError("ResultRecord: sr_uid and study_uid are required")
        if self.eye not in ("R", "L"):
            raise ValueError(f"ResultRecord {self.sr_uid}: eye must be 'R' or 'L', not {self.eye!r}")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"ResultRecord {self.sr_uid}: probability {self.probability} is not in [0, 1]")
        object.__setattr__(self, "state", ResultState(self.state))


class RegisterError(RuntimeError):
    """An action on a result that is missing or not in the state it needs (names the result and state)."""


_COLUMNS = [f.name for f in fields(ResultRecord)]


def _record(row: Any) -> ResultRecord:
    return ResultRecord(**{name: row._mapping[name] for name in _COLUMNS})


def add_records(conn: Connection, records: Sequence[ResultRecord]) -> None:
    """`ResultRegister.add_many` inside a caller's transaction (the study job queues its outbox rows and
    registers their results in one). An existing row is kept as it is."""
    stamp = db.now(conn)
    for record in records:
        values = {name: getattr(record, name) for name in _COLUMNS[:12]}
        new = db.insert(conn, db.results).values(
            **values, state=ResultState.PENDING.value, created_at=stamp, updated_at=stamp
        )
        conn.execute(new.on_conflict_do_nothing(index_elements=[db.results.c.sr_uid]))


def deliver_record(conn: Connection, sr_uid: str, at: Any) -> None:
    """PENDING -> DELIVERED inside a caller's transaction (the outbox's, as it records the SR stored);
    a result past PENDING, or none (a PDF, a rejection note), is left as it is."""
    table = db.results
    conn.execute(
        update(table)
        .where(table.c.sr_uid == sr_uid, table.c.state == ResultState.PENDING.value)
        .values(state=ResultState.DELIVERED.value, delivered_at=at, updated_at=db.now(conn))
    )


def replace_records(conn: Connection, sr_uids: Sequence[str], by: str, rejection_uid: str) -> None:
    """`ResultRegister.mark_replaced` inside a caller's transaction (the study job's, with the new results)."""
    values = {"replaced_by": by, "withdraw_reason": "replaced"}
    _withdraw(conn, sr_uids, ResultState.REPLACED, REPLACEABLE, rejection_uid, values)


def withdraw_records(conn: Connection, sr_uids: Sequence[str], reason: str, rejection_uid: str) -> None:
    """`ResultRegister.mark_withdrawn` inside a caller's transaction (with the rejection note's outbox row)."""
    if reason not in WITHDRAW_REASONS[:2]:
        raise ValueError(f"withdraw reason must be one of {WITHDRAW_REASONS[:2]}, not {reason!r}")
    _withdraw(conn, sr_uids, ResultState.WITHDRAWN, CURRENT, rejection_uid, {"withdraw_reason": reason})


def _withdraw(
    conn: Connection,
    sr_uids: Sequence[str],
    state: ResultState,
    allowed: Sequence[ResultState],
    rejection_uid: str,
    values: dict[str, str],
) -> None:
    if not rejection_uid:
        raise ValueError(f"marking results {state}: the rejection note's UID is required")
    table = db.results
    for sr_uid in sr_uids:
        done = conn.execute(
            update(table)
            .where(table.c.sr_uid == sr_uid, table.c.state.in_([s.value for s in allowed]))
            .values(state=state.value, rejection_uid=rejection_uid, updated_at=db.now(conn), **values)
            .returning(table.c.sr_uid)
        ).first()
        if done is None:
            found = _get(conn, sr_uid)
            if found is None or found.state is not state or found.rejection_uid != rejection_uid:
                raise RegisterError(f"result {sr_uid}: cannot become {state}, {_describe(found)}")


class ResultRegister:
    """The `results` table; every call is one short transaction, so several processes can share it.

    `target` is a database URL, an SQLite file path (the embedded index) or an engine to share.
    """

    def __init__(self, target: str | Path | Engine, *, schema_open: bool = False) -> None:
        """`schema_open`: the engine's schema was already opened (an Outbox or StudyIndex on it did): skip
        the check, which on SQLite inspects every table (the study job makes a register per study)."""
        self._owns_engine = not isinstance(target, Engine)
        self.engine = db.open_engine(target) if not isinstance(target, Engine) else target
        if not schema_open:
            schema.open_schema(self.engine)

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()

    def add_many(self, records: Sequence[ResultRecord]) -> None:
        """Add results, idempotently on sr_uid: a re-run keeps the existing row and its state."""
        with db.transaction(self.engine) as conn:
            add_records(conn, records)

    def get(self, sr_uid: str) -> ResultRecord | None:
        with db.transaction(self.engine, write=False) as conn:
            row = conn.execute(select(db.results).where(db.results.c.sr_uid == sr_uid)).first()
        return None if row is None else _record(row)

    def for_study(self, study_uid: str) -> list[ResultRecord]:
        """The study's results, every version, oldest first (then right eye before left)."""
        table = db.results
        query = (
            select(table)
            .where(table.c.study_uid == study_uid)
            .order_by(table.c.study_version, table.c.created_at, table.c.eye.desc())
        )
        return self._select(query)

    def current(self, study_uid: str) -> list[ResultRecord]:
        """The study's results that stand at the PACS (or are on their way): PENDING, DELIVERED, REVIEWED."""
        return [r for r in self.for_study(study_uid) if r.state in CURRENT]

    def replaceable(self, study_uid: str, before_version: int) -> list[ResultRecord]:
        """The results a new study version replaces: earlier versions', PENDING or DELIVERED."""
        return [r for r in self.for_study(study_uid) if r.study_version < before_version and r.state in REPLACEABLE]

    def worklist(  # noqa: PLR0913 - one keyword per filter of the review page (issue #34 API)
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        label: str | None = None,
        disposition: str | None = None,
        min_probability: float | None = None,
        max_probability: float | None = None,
        states: Sequence[ResultState] = (ResultState.DELIVERED,),
        limit: int = 50,
        offset: int = 0,
    ) -> list[ResultRecord]:
        """Results matching every filter given, newest first (created_at; since <= t < until)."""
        if limit < 0 or offset < 0:
            raise ValueError(f"worklist: limit {limit} and offset {offset} must be >= 0")
        table = db.results
        where = _filters(since, until, label, disposition, min_probability, max_probability, states)
        query = (
            select(table).where(*where).order_by(table.c.created_at.desc(), table.c.sr_uid).limit(limit).offset(offset)
        )
        return self._select(query)

    def count(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        label: str | None = None,
        disposition: str | None = None,
        min_probability: float | None = None,
        max_probability: float | None = None,
        states: Sequence[ResultState] = (ResultState.DELIVERED,),
    ) -> int:
        """How many results `worklist` would list without its limit."""
        where = _filters(since, until, label, disposition, min_probability, max_probability, states)
        with db.transaction(self.engine, write=False) as conn:
            return int(conn.execute(select(func.count()).select_from(db.results).where(*where)).scalar_one())

    def since(self, t: float, bundle_version: str | None = None) -> list[ResultRecord]:
        """Every result created at or after `t` (of one bundle version if given), oldest first."""
        table = db.results
        query = select(table).where(table.c.created_at >= t).order_by(table.c.created_at, table.c.sr_uid)
        if bundle_version is not None:
            query = query.where(table.c.bundle_version == bundle_version)
        return self._select(query)

    #: The columns the drift figures read (grok_pacs.ops.drift.ResultRow).
    DRIFT_COLUMNS = (
        "bundle_version",
        "label",
        "probability",
        "disposition",
        "gradability",
        "state",
        "review_outcome",
        "reviewed_label",
        "created_at",
    )

    def drift_rows(self, t: float) -> list[Any]:
        """`since(t)` narrowed to DRIFT_COLUMNS, as plain rows (attribute access): the drift pass reads every
        result of two windows each interval, and building full records cost ten times the query."""
        table = db.results
        query = select(*(table.c[name] for name in self.DRIFT_COLUMNS)).where(table.c.created_at >= t)
        with db.transaction(self.engine, write=False) as conn:
            return list(conn.execute(query))

    def mark_delivered(self, sr_uid: str, at: float) -> None:
        """PENDING -> DELIVERED; a result already past PENDING (or not registered) is left as it is.
        (The outbox does this itself when it records an SR stored: grok_pacs.store.outbox.)"""
        with db.transaction(self.engine) as conn:
            deliver_record(conn, sr_uid, at)

    def mark_replaced(self, sr_uids: Sequence[str], by: str, rejection_uid: str) -> None:
        """PENDING/DELIVERED -> REPLACED by result `by`, withdrawn with the rejection note `rejection_uid`.
        A result already replaced by the same note is left as it is (a re-run); any other state raises."""
        with db.transaction(self.engine) as conn:
            replace_records(conn, sr_uids, by, rejection_uid)

    def mark_withdrawn(self, sr_uids: Sequence[str], reason: str, rejection_uid: str) -> None:
        """PENDING/DELIVERED/REVIEWED -> WITHDRAWN for `reason` ("quality" / "safety"), with its rejection
        note. A result already withdrawn by the same note is left as it is; any other state raises."""
        with db.transaction(self.engine) as conn:
            withdraw_records(conn, sr_uids, reason, rejection_uid)

    def record_review(
        self,
        sr_uid: str,
        *,
        outcome: ReviewOutcome,
        reviewer: str,
        label: str = "",
        note: str = "",
        verified_uid: str = "",
        rejection_uid: str = "",
    ) -> ResultRecord:
        """DELIVERED -> REVIEWED with the clinician's verdict; any other state raises RegisterError.

        `label` is the clinician's label: required for CORRECTED, the AI's own label for ACCEPTED when
        not given, "" for REJECTED unless given."""
        outcome = ReviewOutcome(outcome)
        if not reviewer:
            raise ValueError(f"review of {sr_uid}: the reviewer is required")
        if outcome is ReviewOutcome.CORRECTED and not label:
            raise ValueError(f"review of {sr_uid}: a correction needs the clinician's label")
        table = db.results
        with db.transaction(self.engine) as conn:
            reviewed_label = label or (table.c.label if outcome is ReviewOutcome.ACCEPTED else "")
            stamp = db.now(conn)
            row = conn.execute(
                update(table)
                .where(table.c.sr_uid == sr_uid, table.c.state == ResultState.DELIVERED.value)
                .values(
                    state=ResultState.REVIEWED.value,
                    review_outcome=outcome.value,
                    reviewed_label=reviewed_label,
                    reviewer=reviewer,
                    review_note=note,
                    reviewed_at=stamp,
                    updated_at=stamp,
                    verified_uid=verified_uid,
                    rejection_uid=rejection_uid,
                )
                .returning(*table.columns)
            ).first()
            if row is None:
                raise RegisterError(f"result {sr_uid}: cannot be reviewed, {_describe(_get(conn, sr_uid))}")
            return _record(row)

    def _select(self, query: Select[Any]) -> list[ResultRecord]:
        with db.transaction(self.engine, write=False) as conn:
            return [_record(row) for row in conn.execute(query)]


def _get(conn: Connection, sr_uid: str) -> ResultRecord | None:
    row = conn.execute(select(db.results).where(db.results.c.sr_uid == sr_uid)).first()
    return None if row is None else _record(row)


def _describe(found: ResultRecord | None) -> str:
    return "it is not registered" if found is None else f"it is {found.state}"


def _filters(
    since: float | None,
    until: float | None,
    label: str | None,
    disposition: str | None,
    min_probability: float | None,
    max_probability: float | None,
    states: Sequence[ResultState],
) -> list[ColumnElement[bool]]:
    table = db.results
    where: list[ColumnElement[bool]] = [table.c.state.in_([ResultState(s).value for s in states])]
    if since is not None:
        where.append(table.c.created_at >= since)
    if until is not None:
        where.append(table.c.created_at < until)
    if label is not None:
        where.append(table.c.label == label)
    if disposition is not None:
        where.append(table.c.disposition == disposition)
    if min_probability is not None:
        where.append(table.c.probability >= min_probability)
    if max_probability is not None:
        where.append(table.c.probability <= max_probability)
    return where
