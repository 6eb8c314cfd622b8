"""Durable file writes inside the data directory: temp file, fsync, atomic rename, fsync directory.

A reader (the worker, recovery) therefore sees either no file or a complete one, and a file that has
been renamed into place survives a crash or power loss. Temporary files live in `<data>/tmp/` (same
filesystem as the destination, so rename never copies) and are removed at start-up by recovery.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

TMP_DIR = "tmp"
TMP_PREFIX = "rx-"
QUARANTINE_DIR = "quarantine"


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
    path = Path(path)
    if path.is_dir():
        return
    ensure_dir(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        return  # another association created it concurrently
    fsync_dir(path.parent)


def publish_file(tmp_path: Path, dest: Path, fd: int | None = None) -> None:
    """fsync `tmp_path` (or its open descriptor `fd`), rename it to `dest` atomically, fsync `dest`'s dir."""
    if fd is not None:
        os.fsync(fd)
    else:
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
    ensure_dir(dest.parent)
    os.replace(tmp_path, dest)
    fsync_dir(dest.parent)


def atomic_write_bytes(data_dir: Path, dest: Path, data: bytes) -> None:
    """Write `data` to `dest` durably through a temporary file in `<data>/tmp`."""
    handle = tempfile.NamedTemporaryFile(dir=tmp_dir(data_dir), prefix=TMP_PREFIX, delete=False)
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
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
            handle.flush()
            os.fsync(handle.fileno())
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
