"""A job's own copies of its study's instances, from the object store (only when `storage_url` is set).

A worker on another host never reads the listener's disk: each instance of the snapshot is fetched by
the key its uploader recorded (grok_pacs.store.uploads) into `<worker data_dir>/scratch/<job>/`, checked
against the sha256 in the key on the way (a mismatch never feeds the model), and the snapshot handed
down the study job points at those copies. The scratch directory goes when the job ends, whatever the
outcome. Store unavailable: BlobStoreUnavailable, which the task retries.

An object missing from the store or corrupt (its bytes do not hash to its key) is handed back to the
listener that received the instance (`Uploads.request_reupload`): its uploader puts its local copy again,
and the job waits for that by retrying (InstanceReuploading). When that listener no longer has the file,
the instance is LOST and the job fails the study with that reason (InstanceLostError).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from grok_pacs.config import Settings
from grok_pacs.jobs.retry import InstanceReuploading
from grok_pacs.jobs.snapshot import StudySnapshot, resolve_files, select_candidates
from grok_pacs.store.blobs import BlobIntegrityError, BlobNotFoundError, BlobStore
from grok_pacs.store.files import SCRATCH_DIR
from grok_pacs.store.index import InstanceRecord
from grok_pacs.store.uploads import Uploads, UploadState

log = logging.getLogger("grok_pacs.jobs.fetch")


class InstanceLostError(RuntimeError):
    """An instance is neither in the object store (intact) nor on its listener's disk: the study cannot run."""


def scratch_dir(settings: Settings, job_id: str) -> Path:
    """`<data>/scratch/<job>`: the job id made safe as one directory name."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", job_id).lstrip(".") or "job"
    return Path(settings.data_dir) / SCRATCH_DIR / name


@contextmanager
def local_copies(
    settings: Settings, uploads: Uploads, store: BlobStore, snapshot: StudySnapshot, job_id: str
) -> Iterator[StudySnapshot]:
    """The snapshot with every instance's `path` on a verified copy in this job's scratch directory."""
    if snapshot.void is not None or not snapshot.instances:
        yield snapshot
        return
    scratch = scratch_dir(settings, job_id)
    try:
        instances = tuple(_fetch(settings, uploads, store, rec, scratch) for rec in snapshot.instances)
        eyes, _notes = select_candidates(list(instances), settings)
        yield dataclasses.replace(snapshot, instances=instances, eyes=eyes, files=resolve_files(settings, instances))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # only this job's copies; a retry fetches again


def _fetch(
    settings: Settings, uploads: Uploads, store: BlobStore, rec: InstanceRecord, scratch: Path
) -> InstanceRecord:
    state = uploads.state(rec.sop_uid)
    if state is UploadState.LOST:
        raise InstanceLostError(
            f"instance {rec.sop_uid} is lost: missing or corrupt in the object store, "
            "and its listener no longer has the file"
        )
    if state is UploadState.REUPLOAD:
        raise InstanceReuploading(f"instance {rec.sop_uid}: its listener is uploading it again")
    key = uploads.key(rec.sop_uid)
    if key is None:  # assembly queues a study only when all its instances are uploaded
        raise BlobNotFoundError(f"instance {rec.sop_uid} of study {rec.study_uid} was never uploaded")
    try:
        copy = store.get(key, scratch)
    except (BlobNotFoundError, BlobIntegrityError) as exc:
        uploads.request_reupload(rec.sop_uid)
        log.warning("instance %s: %s; asked its listener to upload it again", rec.sop_uid, exc)
        raise InstanceReuploading(f"instance {rec.sop_uid}: {type(exc).__name__}, uploading it again") from exc
    return dataclasses.replace(rec, path=copy.relative_to(settings.data_dir).as_posix())
