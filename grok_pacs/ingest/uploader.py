"""The per-host uploader: copies each LOCAL instance received on this host into the object store and
records it UPLOADED (grok_pacs.store.uploads), only when `storage_url` is set.

C-STORE answers Success after the local fsync and the index commit (receiving straight into S3 is ~30x
slower); this loop uploads afterwards. Each pass reads the LOCAL instances from the database, so a
restart resumes where it stopped. Store down: the pass ends at the first unavailable put, the instances
stay LOCAL (their studies are not queued) and the next pass tries again. On a database shared by several
listeners it reads only the rows its own node received (`Uploads.node_id`, column `received_by`): another
listener's LOCAL instance is that host's to upload. A row of its own whose file is gone (lost before its
upload) is refused like a corrupt one: logged and counted once, its study waits. The local file is never
deleted here. An instance a worker found missing or corrupt in the store (REUPLOAD) is put again from the
local file, over what the store holds; its file gone too, it is recorded LOST (the worker fails the study).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from grok_pacs.dicom.uids import resolve_inside
from grok_pacs.ops import metrics
from grok_pacs.ops.periodic import Periodic
from grok_pacs.store.blobs import BlobError, BlobKey, BlobStore, BlobStoreUnavailable
from grok_pacs.store.uploads import PendingUpload, Uploads

log = logging.getLogger("grok_pacs.ingest.uploader")

BATCH = 100  # instances read per query; a pass continues until none is left or the store fails


class InstanceFileMissing(ValueError):
    """An instance this node received has no file here any more (the message names its path, never patient data)."""


@dataclass(frozen=True)
class UploadPass:
    uploaded: int  # recorded UPLOADED in this pass
    failed: int  # refused by the store for this instance (e.g. a corrupt existing object): stays LOCAL
    store_down: bool  # the pass stopped because the store was unavailable


class Uploader:
    """`run_once()` uploads what it can; `start()` runs passes every `interval` s in a daemon thread."""

    def __init__(self, data_dir: Path, uploads: Uploads, store: BlobStore, interval: float = 1.0) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, not {interval}")
        self.data_dir = Path(data_dir)
        self.uploads = uploads
        self.store = store
        self.interval = interval
        self._stop = threading.Event()  # also ends a pass early
        self._periodic = Periodic("upload", self.run_once, interval, stop_event=self._stop, join_timeout=30)
        self._down = False  # log an outage once, and its end once
        self._refused: set[str] = set()  # instances whose refusal was logged (not a work queue)

    @property
    def store_down(self) -> bool:
        """The last pass stopped because the store was unavailable (and none has uploaded since)."""
        return self._down

    def run_once(self) -> UploadPass:
        uploaded = failed = 0
        skipped: set[str] = set()  # this pass: refused instances, not tried again
        while not self._stop.is_set():
            batch = [p for p in self.uploads.pending(BATCH + len(skipped)) if p.sop_uid not in skipped]
            if not batch:
                break
            for pending in batch:
                try:
                    outcome = self._try(pending)
                except BlobStoreUnavailable as exc:
                    metrics.upload("store_down")
                    self._outage(exc)
                    return UploadPass(uploaded, failed, store_down=True)
                uploaded += outcome == "uploaded"
                failed += outcome == "refused"
                if outcome != "uploaded":
                    skipped.add(pending.sop_uid)
        if self._down and uploaded:
            log.info("object store is back: %d instances uploaded", uploaded)
            self._down = False
        return UploadPass(uploaded, failed, store_down=False)

    def _try(self, pending: PendingUpload) -> str:
        """ "uploaded", "lost" (REUPLOAD with no file left: LOST) or "refused" (stays LOCAL; logged and counted
        once per instance, it is tried again every pass). BlobStoreUnavailable passes through."""
        try:
            if not self._upload(pending):
                return "lost"
        except BlobStoreUnavailable:
            raise
        except (BlobError, ValueError) as exc:
            if pending.sop_uid not in self._refused:
                self._refused.add(pending.sop_uid)
                log.error("upload of instance %s refused: %s (it stays LOCAL, its study waits)", pending.sop_uid, exc)
                metrics.upload("refused")
            return "refused"
        self._refused.discard(pending.sop_uid)
        metrics.upload("uploaded")
        return "uploaded"

    def _upload(self, pending: PendingUpload) -> bool:
        """Put one instance and record it: True; False when it is recorded LOST instead."""
        path = resolve_inside(self.data_dir, pending.path)
        if not path.is_file() and pending.reupload:  # the store's copy and ours are both gone
            self.uploads.mark_lost(pending.sop_uid)
            log.error("instance %s is lost: the object store lost it and its file is gone here", pending.sop_uid)
            metrics.upload("lost")
            return False
        if not path.is_file():  # this node received it (Uploads.node_id): the file was here, and is lost
            raise InstanceFileMissing(f"its file {pending.path} is missing from this listener's data directory")
        key = BlobKey.for_file("instances", pending.study_uid, pending.sop_uid, path)
        self.store.put(key, path, replace=pending.reupload)
        self.uploads.record(pending.sop_uid, key)
        if pending.reupload:
            log.warning("instance %s uploaded again (the object store had lost or corrupted it)", pending.sop_uid)
        return True

    def _outage(self, exc: BlobStoreUnavailable) -> None:
        if not self._down:
            log.warning("object store unavailable, instances stay LOCAL and studies wait: %s", exc)
            self._down = True

    def start(self) -> None:
        self._periodic.start()

    def stop(self) -> None:
        self._periodic.stop()
