"""The blob store: immutable, content-addressed objects (received instances, SRs, PDFs) and its local backend.

A key names its content: `instances/<study>/<sop>.<sha256>.dcm`, so an object is never overwritten in
place, a second write of the same key is the same bytes (success, not an error), and every read is
checked against the hash in the key: a mismatch raises BlobIntegrityError and leaves no file behind,
never data. Reads land in the caller's scratch directory through a temporary file and a rename, so a
file with the key's name is always complete and verified.

Two backends: `LocalBlobStore` (files under `<data>/blobs/`, fsynced; the one-box default) here, and
`grok_pacs.store.s3.S3BlobStore`; `grok_pacs.store.storage.open_blob_store` picks one from the settings.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from grok_pacs.dicom.uids import require_uid
from grok_pacs.store import files

CHUNK = 1 << 20
BLOBS_DIR = "blobs"
KINDS = ("instances", "results")  # received instances; SRs and PDFs built by the workers


def is_result_key(path: str) -> bool:
    """An outbox path that is a results key in the store (`results/<study>/...`), not a file under sr/."""
    return path.startswith(f"{KINDS[1]}/")


_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_KEY_RE = re.compile(r"(instances|results)/([0-9.]+)/([0-9.]+)\.([0-9a-f]{64})\.([a-z0-9]{1,8})")


class BlobError(RuntimeError):
    """Base of the blob store's errors; messages name the store and the key, never patient data."""


class BlobStoreUnavailable(BlobError):
    """The store cannot be reached or refuses service (down, network, permissions): try again later."""


class BlobNotFoundError(BlobError):
    """No object under the key."""


class BlobIntegrityError(BlobError):
    """Bytes that do not hash to the key's sha256 (corrupted or replaced out of band): never used."""


@dataclass(frozen=True)
class BlobKey:
    """An object's name: kind, study, SOP instance and the sha256 of its bytes (all validated)."""

    kind: str
    study_uid: str
    sop_uid: str
    sha256: str
    suffix: str = "dcm"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"blob kind {self.kind!r} is not one of {KINDS}")
        require_uid(self.study_uid, "StudyInstanceUID")
        require_uid(self.sop_uid, "SOPInstanceUID")
        if not _SHA256_RE.fullmatch(self.sha256):
            raise ValueError(f"{self.sha256!r} is not a lower-case hex sha256")
        if not re.fullmatch(r"[a-z0-9]{1,8}", self.suffix):
            raise ValueError(f"blob suffix {self.suffix!r} is not 1-8 of a-z 0-9")

    @classmethod
    def parse(cls, text: str) -> BlobKey:
        """The key written by `str(key)` (e.g. read back from the database); ValueError otherwise."""
        match = _KEY_RE.fullmatch(text)
        if not match:
            raise ValueError(f"{text!r} is not a blob key (<kind>/<study>/<sop>.<sha256>.<suffix>)")
        return cls(*match.groups())

    @classmethod
    def for_file(cls, kind: str, study_uid: str, sop_uid: str, path: Path, suffix: str = "dcm") -> BlobKey:
        """The key of a local file's current content."""
        return cls(kind, study_uid, sop_uid, sha256_file(path), suffix)

    @property
    def path(self) -> PurePosixPath:
        return PurePosixPath(self.kind, self.study_uid, f"{self.sop_uid}.{self.sha256}.{self.suffix}")

    def __str__(self) -> str:
        return str(self.path)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_source(key: BlobKey, source: Path) -> int:
    """The size of `source`, after checking that it hashes to `key` (a mislabelled upload fails loudly)."""
    actual = sha256_file(source)
    if actual != key.sha256:
        raise BlobIntegrityError(f"{source} hashes to {actual}, not to its key {key}")
    return source.stat().st_size


def write_verified(key: BlobKey, chunks: Iterable[bytes], scratch_dir: Path, where: str) -> Path:
    """Write `chunks` to `<scratch_dir>/<key>` through a temporary file, renamed only if the sha256 matches.

    A mismatch removes the temporary file and raises BlobIntegrityError naming `where` (the store); a full
    scratch filesystem raises files.DiskFullError (the job waits for space, it does not fail).
    """
    dest = Path(scratch_dir) / key.path
    digest = hashlib.sha256()
    with files.full_disk_as_error():
        dest.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(dir=dest.parent, prefix=".part-", delete=False)
        try:
            with handle:
                for chunk in chunks:
                    digest.update(chunk)
                    handle.write(chunk)
            if digest.hexdigest() != key.sha256:
                raise BlobIntegrityError(f"{where}: object {key} hashes to {digest.hexdigest()}: refused")
            os.replace(handle.name, dest)
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise
    return dest


def read_chunks(stream: BinaryIO) -> Iterable[bytes]:
    while chunk := stream.read(CHUNK):
        yield chunk


class BlobStore(ABC):
    """Immutable objects by BlobKey. Implementations raise only BlobError subclasses for store problems."""

    @abstractmethod
    def put(self, key: BlobKey, source: Path, *, replace: bool = False) -> bool:
        """Store `source` (which must hash to `key`) unless the key exists: True = written now, False =
        already there (same bytes by construction). Durable on return as far as the backend promises.
        `replace`: write it even over an existing object (one found corrupt: the same key, other bytes)."""

    @abstractmethod
    def get(self, key: BlobKey, scratch_dir: Path) -> Path:
        """A verified copy at `<scratch_dir>/<key>`; BlobNotFoundError, BlobIntegrityError, BlobStoreUnavailable."""

    @abstractmethod
    def exists(self, key: BlobKey) -> bool:
        """Whether an object is stored under `key` (its content is checked on `get`, not here)."""

    @abstractmethod
    def delete(self, key: BlobKey) -> int:
        """Remove the object under `key` (retention); returns the bytes freed, 0 if there was none."""

    @abstractmethod
    def check(self) -> None:
        """Raise BlobStoreUnavailable unless the store answers (a health check)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""


class LocalBlobStore(BlobStore):
    """Objects as files under `<data>/blobs/<key>`: temp file in `<data>/tmp`, fsync, link into place."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / BLOBS_DIR
        files.ensure_dir(self.root)

    def __repr__(self) -> str:
        return f"LocalBlobStore({self.root})"

    def _file(self, key: BlobKey) -> Path:
        self.check()
        return self.root / key.path

    def put(self, key: BlobKey, source: Path, *, replace: bool = False) -> bool:
        size = check_source(key, source)
        dest = self._file(key)
        if replace:
            dest.unlink(missing_ok=True)  # a corrupt object: the link below writes the verified source
        elif dest.exists():
            return self._same_size(key, dest, size)
        try:
            handle = tempfile.NamedTemporaryFile(
                dir=files.tmp_dir(self.data_dir), prefix=files.TMP_PREFIX, delete=False
            )
            with handle, open(source, "rb") as src:
                for chunk in read_chunks(src):
                    handle.write(chunk)
            return self._link(key, Path(handle.name), dest, size)
        except OSError as exc:
            raise BlobStoreUnavailable(f"{self!r}: cannot write {key}: {exc}") from exc

    def _link(self, key: BlobKey, tmp: Path, dest: Path, size: int) -> bool:
        """Give the fsynced temporary file the key's name unless it has one already (link is atomic and
        never replaces: the conditional write)."""
        try:
            files.start_fsync(tmp).result()
            files.ensure_dir(dest.parent)
            try:
                os.link(tmp, dest)
            except FileExistsError:
                return self._same_size(key, dest, size)
            files.fsync_dir(dest.parent)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _same_size(self, key: BlobKey, dest: Path, size: int) -> bool:
        stored = dest.stat().st_size
        if stored != size:
            raise BlobIntegrityError(f"{self!r}: existing object {key} has the wrong size ({stored} bytes, not {size})")
        return False

    def get(self, key: BlobKey, scratch_dir: Path) -> Path:
        path = self._file(key)
        try:
            with open(path, "rb") as stream:
                return write_verified(key, read_chunks(stream), scratch_dir, repr(self))
        except FileNotFoundError as exc:
            raise BlobNotFoundError(f"{self!r}: no object {key}") from exc

    def exists(self, key: BlobKey) -> bool:
        return self._file(key).is_file()

    def delete(self, key: BlobKey) -> int:
        path = self._file(key)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise BlobStoreUnavailable(f"{self!r}: cannot delete {key}: {exc}") from exc
        return size

    def close(self) -> None:
        """Nothing held open between calls."""

    def check(self) -> None:
        if not self.root.is_dir():
            raise BlobStoreUnavailable(f"{self!r}: {self.root} is not a directory (store missing or unmounted)")
