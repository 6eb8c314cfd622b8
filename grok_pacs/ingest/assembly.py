"""Study assembly: a study is complete after `quiet_period` seconds without a new instance; then its
job goes on the broker. Also crash recovery at start-up.

Publishing comes before recording: publish (study, version N+1), then mark the study QUEUED at N+1 in
the index (only if nothing arrived meanwhile). A crash in between publishes the same (study, version)
again after restart; the worker treats a job whose version the study has already moved past, or whose
study is not QUEUED at that version, as done. Nothing is lost; a duplicate is harmless.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from grok_pacs.config import Settings
from grok_pacs.dicom.header import IncompleteDatasetError, read_header
from grok_pacs.dicom.uids import INCOMING_DIR, InvalidUIDError, uids_from_relpath
from grok_pacs.ops.periodic import Periodic
from grok_pacs.store.files import quarantine, remove_temp_files
from grok_pacs.store.index import InstanceRecord, StudyIndex, StudyRecord

log = logging.getLogger("grok_pacs.ingest.assembly")

TEMP_SWEEP_EVERY_S = 60.0


class Publisher(Protocol):
    def publish(self, study_uid: str, version: int) -> str: ...


@dataclass(frozen=True)
class RecoveryReport:
    temp_files_removed: int
    orphans_indexed: int
    quarantined: int
    missing_files: int


def recover(settings: Settings, index: StudyIndex, uploaded: frozenset[str] = frozenset()) -> RecoveryReport:
    """Before the listener starts: remove temp files, index files on disk that the index lacks, and
    forget index rows whose file is missing (the sender never got Success for them and sends again),
    except `uploaded` paths (the object store holds those; their local copy may have been removed).
    Only this node's rows are compared with its disk (`index.node_id`): on a database shared by several
    listeners, another listener's instances are on its own disk, not missing.

    Complete studies that were never queued stay RECEIVING in the index and are queued by the first
    assembly pass. Unreadable or misnamed files in `incoming/` are moved to `quarantine/`.
    """
    data_dir = Path(settings.data_dir)
    removed = remove_temp_files(data_dir)
    known = index.instance_paths()
    indexed = quarantined = 0
    incoming = data_dir / INCOMING_DIR
    on_disk: set[str] = set()
    for path in sorted(incoming.glob("*/*/*")) if incoming.is_dir() else []:
        relpath = PurePosixPath(path.relative_to(data_dir).as_posix())
        on_disk.add(str(relpath))
        if str(relpath) in known:
            continue
        if _index_orphan(data_dir, path, relpath, index):
            indexed += 1
        else:
            quarantined += 1
    missing = known - on_disk - uploaded
    if missing:  # a crash between the index commit and the rename's fsync: never acknowledged
        log.warning("recovery: %d indexed instances have no file; removed from the index", len(missing))
        index.forget_paths(missing)
    report = RecoveryReport(removed, indexed, quarantined, len(missing))
    log.info(
        "recovery: temp_files_removed=%d orphans_indexed=%d quarantined=%d missing=%d",
        *(report.temp_files_removed, report.orphans_indexed, report.quarantined, report.missing_files),
    )
    return report


def _index_orphan(data_dir: Path, path: Path, relpath: PurePosixPath, index: StudyIndex) -> bool:
    """Index one file found on disk; quarantine it (False) if its name or content is not usable."""
    uids = uids_from_relpath(relpath)
    try:
        if uids is None or not path.is_file():
            raise ValueError("not an incoming/<study>/<series>/<sop>.dcm path")
        header = read_header(path)
        if (header.study_uid, header.series_uid, header.sop_uid) != uids:
            raise ValueError("file's UIDs differ from its path")
    except (ValueError, InvalidUIDError, IncompleteDatasetError, OSError) as exc:
        target = quarantine(data_dir, path) if path.is_file() else path
        log.warning("recovery: %s is unusable (%s); moved to %s", relpath, exc, target)
        return False
    stat = path.stat()
    index.add_instance(
        InstanceRecord.from_header(
            header,
            size=stat.st_size,
            path=relpath.as_posix(),
            received_at=stat.st_mtime,
            calling_ae=header.source_ae,
        )
    )
    return True


class Assembler:
    """Queues quiet studies. `run_once()` does one pass; `start()` runs passes in a daemon thread.

    `waiting`, when given, names the studies that are not complete yet although quiet (instances not in
    the object store yet: grok_pacs.store.uploads); they are queued on a later pass.
    """

    def __init__(
        self,
        settings: Settings,
        index: StudyIndex,
        publisher: Publisher,
        interval: float | None = None,
        waiting: Callable[[], set[str]] | None = None,
    ) -> None:
        self.settings = settings
        self.index = index
        self.publisher = publisher
        self.waiting = waiting
        self.interval = interval if interval is not None else min(1.0, max(0.05, settings.quiet_period / 4))
        self._periodic = Periodic("assembly", self._pass, self.interval)
        self._last_sweep = time.monotonic()

    def run_once(self, now: float | None = None) -> list[tuple[str, int]]:
        """Queue every RECEIVING study quiet since `quiet_period` (on the database's clock; with `now`,
        host time: the last instance at or before `now - quiet_period`); returns [(study_uid, version)].

        Each study is published and recorded QUEUED under its row's lock (`StudyIndex.queue_quiet`), so
        two listeners sharing a database queue it once; a study `waiting` names is left for a later pass."""
        quiet = self.settings.quiet_period
        cutoff = None if now is None else now - quiet
        queued = self.index.queue_quiet(quiet, self._publish, cutoff=cutoff, held=self.waiting)
        for study, version, task_id in queued:
            self._log_queued(study, version, task_id)
        return [(study.study_uid, version) for study, version, _ in queued]

    def _publish(self, study: StudyRecord, version: int) -> str:
        return self.publisher.publish(study.study_uid, version)

    def _log_queued(self, study: StudyRecord, version: int, task_id: str) -> None:
        instances = self.index.instances(study.study_uid)
        log.info(
            "study queued: study=%s version=%d task=%s instances=%d series=%d bytes=%d modalities=%s calling_aes=%s",
            study.study_uid,
            version,
            task_id,
            len(instances),
            len({i.series_uid for i in instances}),
            sum(i.size for i in instances),
            ",".join(sorted({i.modality for i in instances})),
            ",".join(sorted({i.calling_ae for i in instances if i.calling_ae})) or "-",
        )

    def _sweep_temp_files(self) -> None:
        """Remove temp files of transfers abandoned long ago (aborted associations leave them)."""
        if time.monotonic() - self._last_sweep < TEMP_SWEEP_EVERY_S:
            return
        self._last_sweep = time.monotonic()
        stale_after = 2 * max(self.settings.network_timeout, self.settings.dimse_timeout)
        removed = remove_temp_files(Path(self.settings.data_dir), older_than=stale_after)
        if removed:
            log.info("removed %d abandoned temporary files", removed)

    def _pass(self) -> None:
        self.run_once()
        self._sweep_temp_files()

    @property
    def failed_passes(self) -> int:
        """Passes that raised (e.g. broker unreachable); their jobs are queued again by the next pass."""
        return self._periodic.failed_passes

    def start(self) -> None:
        self._periodic.start()

    def stop(self) -> None:
        self._periodic.stop()
