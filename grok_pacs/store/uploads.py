"""Upload state of received instances, in the database: LOCAL until the object store holds a verified copy.

An instance is LOCAL while the `uploads` table has no row for it (the listener's insert stays as it was),
UPLOADED once the uploader has recorded the blob key it wrote. The uploader finds its work by reading
this state on every pass (no in-memory queue: a restart loses nothing and deletes nothing), and assembly
queues a study only when none of its instances is LOCAL. Nothing here deletes a local file: an S3 200 is
not proof of durability on every store, so the local copy stays until an operator's policy removes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import Engine, exists, select

from grok_pacs.store import db, schema
from grok_pacs.store.blobs import BlobKey


class UploadState(StrEnum):
    LOCAL = "LOCAL"  # only on the receiving host's disk
    UPLOADED = "UPLOADED"  # the object store holds it under `blob_key` (the local copy is kept)


@dataclass(frozen=True)
class PendingUpload:
    """A LOCAL instance: where its file is on the receiving host (relative to the data directory)."""

    sop_uid: str
    study_uid: str
    path: str


class Uploads:
    """The `uploads` table beside the index (same engine: pass `StudyIndex.engine`)."""

    def __init__(self, engine: Engine) -> None:
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be an SQLAlchemy Engine, not {type(engine).__name__}")
        self.engine = engine
        schema.open_schema(engine)  # a server database must be at head already (`grok-pacs db upgrade`)

    def pending(self, limit: int = 100) -> list[PendingUpload]:
        """LOCAL instances, oldest first (a study's instances go up together, in arrival order)."""
        inst, up = db.instances, db.uploads
        query = (
            select(inst.c.sop_uid, inst.c.study_uid, inst.c.path)
            .where(~exists().where(up.c.sop_uid == inst.c.sop_uid))
            .order_by(inst.c.received_at, inst.c.sop_uid)
            .limit(limit)
        )
        with db.transaction(self.engine, write=False) as conn:
            return [PendingUpload(*row) for row in conn.execute(query)]

    def record(self, sop_uid: str, key: BlobKey) -> bool:
        """LOCAL -> UPLOADED with the key written; False (no change) if it was recorded already."""
        if not isinstance(key, BlobKey):
            raise TypeError(f"key must be a BlobKey, not {type(key).__name__}")
        with db.transaction(self.engine) as conn:
            new = db.insert(conn, db.uploads).values(
                sop_uid=sop_uid, study_uid=key.study_uid, blob_key=str(key), uploaded_at=time.time()
            )
            return conn.execute(new.on_conflict_do_nothing().returning(db.uploads.c.sop_uid)).first() is not None

    def state(self, sop_uid: str) -> UploadState:
        return UploadState.UPLOADED if self.key(sop_uid) is not None else UploadState.LOCAL

    def key(self, sop_uid: str) -> BlobKey | None:
        """The object holding an instance, None while it is LOCAL."""
        with db.transaction(self.engine, write=False) as conn:
            text = conn.execute(select(db.uploads.c.blob_key).where(db.uploads.c.sop_uid == sop_uid)).scalar()
        return None if text is None else BlobKey.parse(text)

    def studies_waiting(self) -> set[str]:
        """Studies with at least one LOCAL instance: not complete for assembly while the store lacks it."""
        inst, up = db.instances, db.uploads
        query = select(inst.c.study_uid).distinct().where(~exists().where(up.c.sop_uid == inst.c.sop_uid))
        with db.transaction(self.engine, write=False) as conn:
            return set(conn.execute(query).scalars())

    def uploaded_paths(self) -> set[str]:
        """Local paths of UPLOADED instances: recovery must not forget these when their file is gone."""
        inst, up = db.instances, db.uploads
        query = select(inst.c.path).join(up, up.c.sop_uid == inst.c.sop_uid)
        with db.transaction(self.engine, write=False) as conn:
            return set(conn.execute(query).scalars())
