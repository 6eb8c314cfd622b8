"""Upload state of received instances, in the database: LOCAL until the object store holds a verified copy.

Two columns of `instances` (`upload_state`, `blob_key`; migration 0002): the listener's insert leaves
them at their defaults (LOCAL, no key), the uploader records UPLOADED with the key it wrote. The
uploader finds its work by reading this state on every pass (no in-memory queue: a restart loses nothing
and deletes nothing), and assembly queues a study only when none of its instances is LOCAL; both
queries use the index on the state. Nothing here deletes a local file: an S3 200 is not proof of
durability on every store, so the local copy stays until an operator's policy removes it.

An object found missing or corrupt later (by a worker fetching it) goes UPLOADED -> REUPLOAD: the receiving
host's uploader puts its local copy again (-> UPLOADED), or, its file gone too, records it LOST (the worker
then fails the study with that reason).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import Engine, and_, select, update

from grok_pacs.store import db, schema
from grok_pacs.store.blobs import BlobKey


class UploadState(StrEnum):
    LOCAL = "LOCAL"  # only on the receiving host's disk
    UPLOADED = "UPLOADED"  # the object store holds it under `blob_key` (the local copy is kept)
    REUPLOAD = "REUPLOAD"  # the store lost or corrupted `blob_key`: the receiving host puts it again
    LOST = "LOST"  # missing or corrupt in the store, and the receiving host no longer has the file


@dataclass(frozen=True)
class PendingUpload:
    """A LOCAL instance: where its file is on the receiving host (relative to the data directory)."""

    sop_uid: str
    study_uid: str
    path: str
    reupload: bool = False  #: the store held it once and lost or corrupted it (REUPLOAD)


class Uploads:
    """The upload state beside the index (same engine: pass `StudyIndex.engine`). `node_id`: the node
    whose uploader this is (Settings.node_id); `pending` and `uploaded_paths` are its own rows only
    (`db.received_here`), `studies_waiting` counts every node's (another's LOCAL instance holds a study too)."""

    def __init__(self, engine: Engine, node_id: str = "") -> None:
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be an SQLAlchemy Engine, not {type(engine).__name__}")
        self.engine = engine
        self.node_id = node_id
        schema.open_schema(engine)  # a server database must be at head already (`grok-pacs db upgrade`)

    def pending(self, limit: int = 100) -> list[PendingUpload]:
        """This node's LOCAL and REUPLOAD instances, oldest first (a study's instances go up together, in arrival
        order)."""
        inst = db.instances
        waiting = (UploadState.LOCAL.value, UploadState.REUPLOAD.value)
        query = (
            select(inst.c.sop_uid, inst.c.study_uid, inst.c.path, inst.c.upload_state)
            .where(inst.c.upload_state.in_(waiting), db.received_here(self.engine, self.node_id))
            .order_by(inst.c.received_at, inst.c.sop_uid)
            .limit(limit)
        )
        with db.transaction(self.engine, write=False) as conn:
            return [
                PendingUpload(sop, study, path, state == UploadState.REUPLOAD.value)
                for sop, study, path, state in conn.execute(query)
            ]

    def record(self, sop_uid: str, key: BlobKey) -> bool:
        """LOCAL (or REUPLOAD) -> UPLOADED with the key written; False (no change) if it was recorded already."""
        if not isinstance(key, BlobKey):
            raise TypeError(f"key must be a BlobKey, not {type(key).__name__}")
        return self._move(sop_uid, (UploadState.LOCAL, UploadState.REUPLOAD), UploadState.UPLOADED, str(key))

    def request_reupload(self, sop_uid: str) -> bool:
        """UPLOADED -> REUPLOAD: its object is missing or corrupt; the receiving host's uploader puts it again."""
        return self._move(sop_uid, (UploadState.UPLOADED,), UploadState.REUPLOAD)

    def mark_lost(self, sop_uid: str) -> bool:
        """REUPLOAD -> LOST: the receiving host has no file to put again (a worker fails the study)."""
        return self._move(sop_uid, (UploadState.REUPLOAD,), UploadState.LOST)

    def _move(
        self, sop_uid: str, sources: tuple[UploadState, ...], target: UploadState, key: str | None = None
    ) -> bool:
        inst = db.instances
        values = {"upload_state": target.value} | ({} if key is None else {"blob_key": key})
        change = (
            update(inst)
            .where(inst.c.sop_uid == str(sop_uid), inst.c.upload_state.in_([state.value for state in sources]))
            .values(**values)
        )
        with db.transaction(self.engine) as conn:
            return conn.execute(change).rowcount == 1

    def state(self, sop_uid: str) -> UploadState:
        inst = db.instances
        with db.transaction(self.engine, write=False) as conn:
            text = conn.execute(select(inst.c.upload_state).where(inst.c.sop_uid == str(sop_uid))).scalar()
        return UploadState.LOCAL if text is None else UploadState(text)

    def key(self, sop_uid: str) -> BlobKey | None:
        """The object holding an instance, None while it is LOCAL."""
        inst = db.instances
        query = select(inst.c.blob_key).where(
            inst.c.sop_uid == str(sop_uid), inst.c.upload_state == UploadState.UPLOADED.value
        )
        with db.transaction(self.engine, write=False) as conn:
            text = conn.execute(query).scalar()
        return None if text is None else BlobKey.parse(text)

    def studies_waiting(self) -> set[str]:
        """Studies with at least one LOCAL instance: not complete for assembly while the store lacks it."""
        inst = db.instances
        query = select(inst.c.study_uid).distinct().where(inst.c.upload_state == UploadState.LOCAL.value)
        with db.transaction(self.engine, write=False) as conn:
            return set(conn.execute(query).scalars())

    def uploaded_paths(self) -> set[str]:
        """Local paths of this node's instances the store has held (UPLOADED, REUPLOAD, LOST): recovery must not
        forget these when their file is gone."""
        inst = db.instances
        uploaded = and_(inst.c.upload_state != UploadState.LOCAL.value, db.received_here(self.engine, self.node_id))
        with db.transaction(self.engine, write=False) as conn:
            rows = conn.execute(select(inst.c.path).where(uploaded))
            return set(rows.scalars())
