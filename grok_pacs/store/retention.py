"""Retention: what the data directory, the object store and the database stop keeping, and when.

Only a delivered study is ever purged: state DONE and every one of its outbox rows DELIVERED (a study kept
DONE without a destination, FAILED, or still in flight is never touched). `retention_days` after its last
change, its received instances (incoming/ files of this node, their objects) and its result files (sr/,
results objects) are removed and its instance rows deleted; the study row stays, its detail saying so.
`retention_rows_days` after it, once no node holds an instance of it any more, its study and outbox rows go.
Leftover files in tmp/ and scratch/ (a crash mid-write) go after `retention_scratch_hours`.

Files go before rows: a pass that stops half-way leaves rows whose file is missing, which the next pass
(or recovery at start) clears; never a file without a row, which recovery would index as a new arrival.
The listener runs a pass every `retention_interval_s` (`RetentionLoop`); `grok-pacs purge` runs one.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, and_, delete, exists, func, select, update
from sqlalchemy.sql.elements import ColumnElement

from grok_pacs.config import Settings
from grok_pacs.dicom.uids import resolve_inside
from grok_pacs.ops import audit, metrics
from grok_pacs.ops.periodic import Periodic
from grok_pacs.store import db
from grok_pacs.store.blobs import BlobKey, BlobStore, is_result_key
from grok_pacs.store.files import SCRATCH_DIR, TMP_DIR
from grok_pacs.store.outbox import OutboxState
from grok_pacs.store.records import StudyState

log = logging.getLogger("grok_pacs.store.retention")
DAY_S = 86400.0
FIRST_PASS_DELAY_S = 60.0  # after the listener starts: recovery and the first associations go first


@dataclass
class StudyPurge:
    """What one study lost (or, in a dry run, would lose). No patient data: UIDs and counts only."""

    study_uid: str
    instances: int = 0
    results: int = 0
    objects: int = 0  # of those, in the object store
    bytes: int = 0
    rows: bool = False  # its study and outbox rows too


@dataclass
class PurgeReport:
    dry_run: bool
    studies: list[StudyPurge] = field(default_factory=list)
    scratch_files: int = 0
    scratch_bytes: int = 0

    @property
    def bytes(self) -> int:
        return self.scratch_bytes + sum(s.bytes for s in self.studies)


def _delivered(cutoff: float) -> ColumnElement[bool]:
    """The condition on `studies` of a study delivered before `cutoff`: DONE, and every result DELIVERED."""
    studies, outbox = db.studies, db.outbox
    of_study = outbox.c.study_uid == studies.c.study_uid
    return and_(
        studies.c.state == StudyState.DONE.value,
        studies.c.updated_at < cutoff,
        exists().where(of_study),
        ~exists().where(of_study, outbox.c.state != OutboxState.DELIVERED.value),
    )


class Retention:
    """One retention pass at a time over the index `engine`, this node's files and the object `store`."""

    def __init__(self, settings: Settings, engine: Engine, store: BlobStore | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.data_dir = Path(settings.data_dir)

    def run(self, dry_run: bool = False, now: float | None = None) -> PurgeReport:
        """One pass: returns what was removed (or, with `dry_run`, what would be; nothing is touched)."""
        now = time.time() if now is None else now
        report = PurgeReport(dry_run)
        if self.settings.retention_days:
            for study_uid in self._expired(now - self.settings.retention_days * DAY_S, with_instances=True):
                report.studies.append(self._purge_files(study_uid, dry_run))
        if self.settings.retention_rows_days:
            by_uid = {s.study_uid: s for s in report.studies}
            for study_uid in self._expired(now - self.settings.retention_rows_days * DAY_S, with_instances=False):
                purge = by_uid.get(study_uid) or StudyPurge(study_uid)
                if study_uid not in by_uid:
                    report.studies.append(purge)
                purge.rows = self._purge_rows(study_uid, dry_run)
        self._purge_scratch(report, now - self.settings.retention_scratch_hours * 3600)
        if not dry_run:
            self._record(report)
        return report

    def _expired(self, cutoff: float, *, with_instances: bool) -> list[str]:
        """Delivered studies older than `cutoff`: holding instances of this node (files to purge), or
        holding none of another node (rows to purge, once this node's files are gone: in the same pass, so
        that a dry run lists them too)."""
        studies, instances = db.studies, db.instances
        of_study = instances.c.study_uid == studies.c.study_uid
        here = db.received_here(self.engine, self.settings.node_id)
        held = exists().where(of_study, here) if with_instances else ~exists().where(of_study, ~here)
        query = select(studies.c.study_uid).where(_delivered(cutoff), held)
        with db.transaction(self.engine, write=False) as conn:
            return [row.study_uid for row in conn.execute(query.order_by(studies.c.updated_at))]

    def _purge_files(self, study_uid: str, dry_run: bool) -> StudyPurge:
        """Remove the study's instance files and objects and its result files and objects, then the
        instance rows of this node; the study row records it."""
        inst, outbox = db.instances, db.outbox
        purge = StudyPurge(study_uid)
        with db.transaction(self.engine, write=False) as conn:
            rows = conn.execute(
                select(inst.c.sop_uid, inst.c.sop_class_uid, inst.c.path, inst.c.blob_key).where(
                    inst.c.study_uid == study_uid, db.received_here(self.engine, self.settings.node_id)
                )
            ).all()
            results = [row.path for row in conn.execute(select(outbox.c.path).where(outbox.c.study_uid == study_uid))]
        purge.instances, purge.results = len(rows), len(results)
        for row in rows:
            purge.bytes += self._remove_file(row.path, dry_run) + self._remove_object(purge, row.blob_key, dry_run)
        for path in results:
            purge.bytes += (
                self._remove_object(purge, path, dry_run) if is_result_key(path) else self._remove_file(path, dry_run)
            )
        if dry_run:
            return purge
        with db.transaction(self.engine) as conn:
            conn.execute(delete(inst).where(inst.c.sop_uid.in_([row.sop_uid for row in rows])))
            conn.execute(
                update(db.studies)
                .where(db.studies.c.study_uid == study_uid, db.studies.c.state == StudyState.DONE.value)
                .values(detail=func.substr(db.studies.c.detail + _purged_note(purge), 1, 2000))
            )
        audit.study_deleted(study_uid, Counter(row.sop_class_uid for row in rows), reason="retention")
        log.info(
            "retention: study %s purged: %d instances, %d results, %d bytes",
            *(study_uid, purge.instances, purge.results, purge.bytes),
        )
        return purge

    def _purge_rows(self, study_uid: str, dry_run: bool) -> bool:
        if dry_run:
            return True
        with db.transaction(self.engine) as conn:
            held = conn.execute(select(func.count()).where(db.instances.c.study_uid == study_uid)).scalar()
            if held:  # an instance arrived meanwhile: the study is live again
                return False
            conn.execute(delete(db.outbox).where(db.outbox.c.study_uid == study_uid))
            conn.execute(delete(db.studies).where(db.studies.c.study_uid == study_uid))
        log.info("retention: study %s: index and outbox rows deleted", study_uid)
        return True

    def _remove_file(self, relpath: str, dry_run: bool) -> int:
        """Bytes freed by removing `relpath` under the data directory (0 when it is not there)."""
        if not relpath or is_result_key(relpath):
            return 0
        path = resolve_inside(self.data_dir, relpath)
        try:
            size = path.stat().st_size
            if not dry_run:
                path.unlink()
                self._prune(path.parent)
        except FileNotFoundError:
            return 0
        return size

    def _prune(self, directory: Path) -> None:
        """Remove the emptied study and series directories (up to incoming/ or sr/, which stay)."""
        while directory.parent != self.data_dir.resolve() and directory != self.data_dir.resolve():
            try:
                directory.rmdir()
            except OSError:
                return  # not empty (another instance, one arriving now), or gone already
            directory = directory.parent

    def _remove_object(self, purge: StudyPurge, key: str, dry_run: bool) -> int:
        """Bytes freed in the object store by removing `key` (a dry run counts it, its size unknown: 0)."""
        if not key or self.store is None:
            return 0
        blob = BlobKey.parse(key)
        if dry_run:
            purge.objects += int(self.store.exists(blob))
            return 0
        freed = self.store.delete(blob)
        purge.objects += int(freed > 0)
        return freed

    def _purge_scratch(self, report: PurgeReport, cutoff: float) -> None:
        """Files left in tmp/ and scratch/ by a crash mid-write, older than `cutoff`."""
        for top in (self.data_dir / TMP_DIR, self.data_dir / SCRATCH_DIR):
            for root, _dirs, names in os.walk(top):
                for name in names:
                    path = Path(root, name)
                    try:
                        stat = path.stat()
                        if stat.st_mtime >= cutoff:
                            continue
                        if not report.dry_run:
                            path.unlink()
                    except FileNotFoundError:
                        continue  # finished (renamed) or removed meanwhile
                    report.scratch_files += 1
                    report.scratch_bytes += stat.st_size

    def _record(self, report: PurgeReport) -> None:
        metrics.purged(
            studies=sum(1 for s in report.studies if s.instances or s.results),
            rows=sum(1 for s in report.studies if s.rows),
            nbytes=report.bytes,
        )
        if report.scratch_files:
            log.info("retention: %d scratch files removed (%d bytes)", report.scratch_files, report.scratch_bytes)


def _purged_note(purge: StudyPurge) -> str:
    return f"; files purged by retention ({purge.instances} instances, {purge.results} results)"


class RetentionLoop:
    """Retention passes in a daemon thread: the first soon after start, then every `retention_interval_s`."""

    def __init__(self, retention: Retention, first_delay: float = FIRST_PASS_DELAY_S) -> None:
        self.retention = retention
        interval = retention.settings.retention_interval_s
        self.first_delay = min(first_delay, interval)
        self._periodic = Periodic("retention", retention.run, interval, first_delay=self.first_delay)

    def start(self) -> None:
        self._periodic.start()

    def stop(self) -> None:
        self._periodic.stop()
