"""Where a built result (SR, PDF report) lives for its delivery: a file under the worker's `<data>/sr/`, or,
with an object store (`storage_url`), an immutable object whose key the outbox row holds.

An outbox row's `path` is either `sr/<study>/<uid>.dcm` (relative to the data directory of the worker
that built it) or a results key `results/<study>/<uid>.<sha256>.dcm`: the two never look alike. With a
key, any worker can deliver it (a retry need not run where the result was built): the object is fetched
into `<data>/scratch/deliver-<uid>/`, checked against its sha256, read, and the copy removed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from grok_pacs.dicom.uids import resolve_inside
from grok_pacs.store.blobs import KINDS, BlobKey, BlobStore, is_result_key
from grok_pacs.store.files import SCRATCH_DIR

RESULTS = KINDS[1]  # "results"
is_key = is_result_key


def publish(data_dir: Path, store: BlobStore, study_uid: str, sr_uid: str, path: str) -> str:
    """Put the result written at `path` (under `data_dir`) into the store; returns its key for the outbox."""
    if is_key(path):
        return path  # already published (a reused row)
    source = resolve_inside(Path(data_dir), path)
    key = BlobKey.for_file(RESULTS, study_uid, sr_uid, source)
    store.put(key, source)
    return str(key)


def available(data_dir: Path, store: BlobStore | None, path: str) -> bool:
    """Whether a result written earlier can still be delivered (its object or its file exists)."""
    if is_key(path):
        return store is not None and store.exists(BlobKey.parse(path))
    return resolve_inside(Path(data_dir), path).is_file()


def read(data_dir: Path, store: BlobStore | None, path: str) -> Dataset:
    """The result as a dataset. Raises OSError or InvalidDicomError for an unusable file, the store's
    BlobError for an unusable object (BlobStoreUnavailable: try again later)."""
    if not is_key(path):
        return pydicom.dcmread(resolve_inside(Path(data_dir), path))
    key = BlobKey.parse(path)
    if store is None:
        raise OSError(f"result {key} is in the object store, and this process has no storage_url")
    scratch = Path(data_dir) / SCRATCH_DIR / f"deliver-{key.sop_uid}"
    try:
        return pydicom.dcmread(store.get(key, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
