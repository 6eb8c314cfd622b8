"""A job's own copies of its study's instances, from the object store (only when `storage_url` is set).

A worker on another host never reads the listener's disk: each instance of the snapshot is fetched by
the key its uploader recorded (grok_pacs.store.uploads) into `<worker data_dir>/scratch/<job>/`, checked
against the sha256 in the key on the way (a mismatch fails the job loudly, never feeds the model), and
the snapshot handed down the pipeline points at those copies. The scratch directory goes when the job
ends, whatever the outcome. Store unavailable: BlobStoreUnavailable, which the task retries.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from grok_pacs.config import Settings
from grok_pacs.jobs.snapshot import StudySnapshot, select_candidates
from grok_pacs.store.blobs import BlobNotFoundError, BlobStore
from grok_pacs.store.index import InstanceRecord
from grok_pacs.store.uploads import Uploads

SCRATCH_DIR = "scratch"


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
        yield dataclasses.replace(snapshot, instances=instances, eyes=eyes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # only this job's copies; a retry fetches again


def _fetch(
    settings: Settings, uploads: Uploads, store: BlobStore, rec: InstanceRecord, scratch: Path
) -> InstanceRecord:
    key = uploads.key(rec.sop_uid)
    if key is None:  # assembly queues a study only when all its instances are uploaded
        raise BlobNotFoundError(f"instance {rec.sop_uid} of study {rec.study_uid} was never uploaded")
    copy = store.get(key, scratch)
    return dataclasses.replace(rec, path=copy.relative_to(settings.data_dir).as_posix())
