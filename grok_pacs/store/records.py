"""The index's records (an instance, a study, a study with its instances, the study states) and how they
map to rows of the `db` tables, with the two statements of the listener's per-instance write (built once
per engine: building them cost more than running them). `index` re-exports the records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import Engine, bindparam

from grok_pacs.dicom.header import Header
from grok_pacs.store import db


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

    @classmethod
    def from_header(
        cls, header: Header, *, size: int, path: str, received_at: float, calling_ae: str
    ) -> InstanceRecord:
        """The record of a stored file: what its header says, and where and when it was received."""
        return cls(
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            sop_uid=header.sop_uid,
            sop_class_uid=header.sop_class_uid,
            modality=header.modality,
            laterality=header.laterality,
            frames=header.frames,
            size=size,
            path=path,
            received_at=received_at,
            calling_ae=calling_ae,
            acquisition_datetime=header.acquisition_datetime,
            transfer_syntax=header.transfer_syntax,
        )


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


INSTANCE_FIELDS = [field.name for field in dataclasses.fields(InstanceRecord)]
STUDY_FIELDS = [field.name for field in dataclasses.fields(StudyRecord)]
INSTANCE_COLUMNS = [db.instances.c[name] for name in INSTANCE_FIELDS]
STUDY_COLUMNS = [db.studies.c[name] for name in STUDY_FIELDS]


def study_from_row(row: Any) -> StudyRecord:
    values = dict(zip(STUDY_FIELDS, row))
    values["state"] = StudyState(values["state"])
    return StudyRecord(**values)


def insert_instance(engine: Engine) -> Any:
    """INSERT an instance row unless its SOP Instance UID is known; returns a row only when inserted.
    Parameters: the InstanceRecord's fields and `received_by` (the receiving node)."""
    table = db.instances
    values = {name: bindparam(name) for name in [*INSTANCE_FIELDS, "received_by"]}
    return db.insert(engine, table).values(values).on_conflict_do_nothing().returning(table.c.sop_uid)


def upsert_study(engine: Engine) -> Any:
    """Create the instance's study RECEIVING, or count the instance in and put it back into RECEIVING."""
    table = db.studies
    received = bindparam("received_at")
    new = db.insert(engine, table).values(
        study_uid=bindparam("study_uid"),
        state=StudyState.RECEIVING.value,
        version=0,
        detail="",
        instance_count=1,
        first_received_at=received,
        last_received_at=received,
        updated_at=db.clock(engine),
    )
    return new.on_conflict_do_update(
        index_elements=[table.c.study_uid],
        set_={
            "state": new.excluded.state,
            "detail": "",
            "instance_count": table.c.instance_count + 1,
            "first_received_at": db.least(engine, table.c.first_received_at, new.excluded.first_received_at),
            "last_received_at": db.greatest(engine, table.c.last_received_at, new.excluded.last_received_at),
            "updated_at": new.excluded.updated_at,
        },
    )
