"""Group commit of received instances: the index rows and directory fsyncs of concurrent associations
share one transaction and one round of barriers instead of queueing on the index lock one by one.

Each caller has already made its file's data durable and renamed it into place; what remains before
Success is that the rename (the directory entry) and the index row are durable. `GroupCommit.commit`
queues the caller's row; the first caller to find no commit running becomes the leader and commits every
row queued so far in ONE index transaction (one WAL fsync), while the pool fsyncs each distinct changed
directory once (instances of one series share their directory); the others wait and get their own
result. A caller that arrives while a commit runs is in the next one. With one association the leader
is always the caller itself: no extra thread hop, the same two overlapping barriers as before.

Why the directory fsync and the commit may overlap: a crash can leave a committed row whose rename was
not yet durable. That instance was never acknowledged, and recovery drops index rows whose file is
missing (`ingest.assembly.recover`), so the sender's retry stores it again.

Why the commit need not be fsynced (`row_index`: on the embedded SQLite, rows are committed with
`synchronous=NORMAL`): before Success the file's data (fdatasync before the rename) and its name (the
directory fsync) are durable, and recovery indexes every file in `incoming/` that has no row. A power loss
may roll back the last rows, never a file, so every acknowledged instance is indexed again at the next
start. A process crash loses nothing (the WAL is written before Success), and any later `FULL` commit
(assembly, worker, uploader) makes these rows durable with it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import event

from grok_pacs.store import db
from grok_pacs.store.index import InstanceRecord, StudyIndex


@dataclass
class _Entry:
    record: InstanceRecord
    directories: list[Path]
    done: bool = False
    added: bool = False
    error: BaseException | None = None


@dataclass
class GroupCommit:
    """`commit(record, directories)` returns once the row and those directories are durable."""

    index: StudyIndex
    sync_directory: Callable[[Path], Future]  # starts one directory fsync (e.g. in the fsync pool)
    _cond: threading.Condition = field(default_factory=threading.Condition, init=False)
    _pending: list[_Entry] = field(default_factory=list, init=False)
    _leading: bool = field(default=False, init=False)
    batches: int = field(default=0, init=False)  # commits made (rows / batches = rows per commit)
    rows: int = field(default=0, init=False)

    @property
    def queued(self) -> int:
        """Rows waiting for the next commit."""
        with self._cond:
            return len(self._pending)

    def commit(self, record: InstanceRecord, directories: list[Path]) -> bool:
        """Make `record`'s row and `directories` durable; True if the row is new (False: known already).

        Raises what the index or an fsync raised for this row's batch (nothing of it is acknowledged)."""
        entry = _Entry(record, directories)
        with self._cond:
            self._pending.append(entry)
            while self._leading and not entry.done:
                self._cond.wait()
            lead = not entry.done
            if lead:
                self._leading, batch, self._pending = True, self._pending, []
        if lead:
            try:
                self._flush(batch)
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()
        return self._result(entry)

    @staticmethod
    def _result(entry: _Entry) -> bool:
        if entry.error is not None:
            raise entry.error
        return entry.added

    def _flush(self, batch: list[_Entry]) -> None:
        try:
            self._commit(batch)
        except BaseException as exc:  # noqa: BLE001 - a bug here must still answer every waiting caller
            for entry in batch:
                entry.error, entry.done = entry.error or exc, True
            raise

    def _commit(self, batch: list[_Entry]) -> None:
        directories = list(dict.fromkeys(d for entry in batch for d in entry.directories))
        syncs = {directory: self.sync_directory(directory) for directory in directories}
        try:
            added = self.index.add_instances([entry.record for entry in batch])
            failure = None
        except Exception as exc:  # noqa: BLE001 - handed to every caller of this batch, who refuses
            added, failure = [False] * len(batch), exc
        failed = {directory: future.exception() for directory, future in syncs.items()}
        for entry, was_added in zip(batch, added, strict=True):
            entry.added = was_added
            entry.error = failure or next((failed[d] for d in entry.directories if failed[d] is not None), None)
            entry.done = True
        self.batches += 1
        self.rows += len(batch)


def _no_commit_fsync(dbapi_conn, _record) -> None:
    dbapi_conn.execute("PRAGMA synchronous=NORMAL")


def row_index(index: StudyIndex) -> StudyIndex:
    """The index the listener commits rows through: on the embedded SQLite a second engine on the same
    file whose commits skip the WAL fsync (see above; close it with `.engine.dispose()`); on a database
    server `index` itself (its rows are not re-derived from this host's files)."""
    if not db.is_sqlite(index.engine):
        return index
    engine = db.open_engine(index.engine.url.render_as_string(hide_password=False))
    event.listen(engine, "connect", _no_commit_fsync)  # after open_engine's pragmas: NORMAL wins
    return StudyIndex(engine, node_id=index.node_id)  # the rows name their listener here too
