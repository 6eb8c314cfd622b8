"""Durable file writes inside the data directory: temp file, fsync, atomic rename, fsync directory.

A reader (the worker, recovery) therefore sees either no file or a complete one, and a file that has
been renamed into place survives a crash or power loss. Temporary files live in `<data>/tmp/` (same
filesystem as the destination, so rename never copies) and are removed at start-up by recovery.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

TMP_DIR = "tmp"
TMP_PREFIX = "rx-"
QUARANTINE_DIR = "quarantine"
SCRATCH_DIR = "scratch"  # per-job copies (worker inputs, results fetched for delivery); retention clears it
T = TypeVar("T")
FSYNC_THREADS = 32  # fsyncs wait on the disk, not the CPU: a file and a directory per association in flight
_FSYNC_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def tmp_dir(data_dir: Path) -> Path:
    """`<data>/tmp`, created if missing."""
    path = Path(data_dir) / TMP_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path) -> None:
    """Create `path` and missing parents, fsyncing each parent whose entries changed."""
    for parent in make_dirs(path):
        fsync_dir(parent)


def make_dirs(path: Path) -> list[Path]:
    """Create `path` and missing parents (no fsync); returns the directories whose entries changed."""
    path = Path(path)
    if path.is_dir():
        return []
    changed = make_dirs(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        pass  # created concurrently by another association; its parent is fsynced here all the same
    return [*changed, path.parent]


def _fsync_and_close(fd: int) -> None:
    # fdatasync: the data and what is needed to read it back (size, blocks); timestamps may lag. The
    # name is made durable separately (the directory's fsync).
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _pool() -> ThreadPoolExecutor:
    global _FSYNC_POOL
    with _POOL_LOCK:
        if _FSYNC_POOL is None:
            _FSYNC_POOL = ThreadPoolExecutor(max_workers=FSYNC_THREADS, thread_name_prefix="grok-fsync")
        return _FSYNC_POOL


def start_fsync(path: Path) -> Future:
    """Begin fsyncing `path` in the background (the caller can check the file meanwhile)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _pool().submit(_fsync_and_close, fd)
    except BaseException:
        os.close(fd)
        raise


def start_directory_fsync(path: Path) -> Future:
    """Begin fsyncing a directory in the background (its new entries become durable)."""
    return _pool().submit(fsync_dir, path)


def place_file(tmp_path: Path, dest: Path, synced: Future) -> list[Path]:
    """Rename a finished temporary file to `dest` once its data is durable (`synced`, from start_fsync),
    so a name never points at content that is not durable; creates missing directories. Returns the
    directories whose entries changed: the rename is durable only once each is fsynced (the caller
    does that, possibly together with other renames: `group_commit.GroupCommit`)."""
    synced.result()
    changed = make_dirs(dest.parent)
    os.replace(tmp_path, dest)
    return list(dict.fromkeys([*changed, dest.parent]))


def publish_file(
    tmp_path: Path, dest: Path, commit: Callable[[], T] | None = None, synced: Future | None = None
) -> T | None:
    """Move a finished temporary file into place durably, recording it with `commit` on the way.

    Order: the file's fsync completes (`synced`, from start_fsync, or done here) before it gets its
    name, so a name never points at content that is not durable; create missing directories; rename
    atomically; then `commit` (e.g. the index row, which fsyncs itself) runs while the changed
    directories are fsynced in parallel (independent, so two journal commits overlap instead of adding
    up). Returns `commit()`'s result once all of it is durable: only then may Success be reported.
    """
    directories = place_file(tmp_path, dest, synced or start_fsync(tmp_path))
    directory_syncs = [start_directory_fsync(d) for d in directories]
    try:
        return commit() if commit is not None else None
    finally:
        for future in directory_syncs:
            future.result()


class DiskFullError(OSError):
    """A write failed because the filesystem is full (ENOSPC) or a quota is reached (EDQUOT): worth trying
    again once space is freed (retention, an operator), unlike other I/O errors."""


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


@contextlib.contextmanager
def full_disk_as_error() -> Iterator[None]:
    """Raise DiskFullError (an OSError) for a full filesystem inside the block; other errors unchanged."""
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS and not isinstance(exc, DiskFullError):
            raise DiskFullError(exc.errno, exc.strerror, exc.filename) from exc
        raise


def atomic_write_bytes(data_dir: Path, dest: Path, data: bytes) -> None:
    """Write `data` to `dest` durably through a temporary file in `<data>/tmp` (DiskFullError when full)."""
    with full_disk_as_error():
        handle = tempfile.NamedTemporaryFile(dir=tmp_dir(data_dir), prefix=TMP_PREFIX, delete=False)
        try:
            with handle:
                handle.write(data)
            publish_file(Path(handle.name), dest)
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise


def atomic_copy(data_dir: Path, source: Path, dest: Path) -> None:
    """Copy `source` to `dest` durably (used when a received file is not on the data filesystem)."""
    handle = tempfile.NamedTemporaryFile(dir=tmp_dir(data_dir), prefix=TMP_PREFIX, delete=False)
    try:
        with handle, open(source, "rb") as src:
            shutil.copyfileobj(src, handle, 1 << 20)
        publish_file(Path(handle.name), dest)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def remove_temp_files(data_dir: Path, older_than: float | None = None) -> int:
    """Delete leftover temporary files (all, or those not modified for `older_than` seconds)."""
    directory = Path(data_dir) / TMP_DIR
    if not directory.is_dir():
        return 0
    removed = 0
    cutoff = None if older_than is None else time.time() - older_than
    for entry in os.scandir(directory):
        if not entry.is_file(follow_symlinks=False):
            continue
        try:
            if cutoff is not None and entry.stat(follow_symlinks=False).st_mtime > cutoff:
                continue
            os.unlink(entry.path)
            removed += 1
        except FileNotFoundError:
            continue  # finished (renamed) or removed concurrently
    return removed


def quarantine(data_dir: Path, path: Path) -> Path:
    """Move an unusable file out of `incoming/` to `<data>/quarantine/` (kept for an administrator)."""
    directory = Path(data_dir) / QUARANTINE_DIR
    ensure_dir(directory)
    target = directory / f"{int(time.time() * 1000)}-{path.name}"
    os.replace(path, target)
    fsync_dir(directory)
    return target


def free_bytes(path: Path) -> int:
    """Bytes available to unprivileged writers on the filesystem holding `path`."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize
