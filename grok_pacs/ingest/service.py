"""The ingest service: recovery, then the C-STORE listener, the uploader (when `storage_url` is set), the
assembly loop, the reaper (unfinished work whose job was lost is queued again) and the drift figures on
/metrics (`grok_pacs.ops.drift`, from the results register), in one process.

This is what `grok-pacs listen` runs; the demo and tests start it in-process the same way. The job
publisher is handed in (`grok_pacs.jobs.publisher.JobPublisher` in production): ingest never imports the
queue side; the service closes the publisher when it stops.
"""

from __future__ import annotations

import logging
from typing import Protocol

from grok_pacs.config import Settings, SettingsError
from grok_pacs.ingest.assembly import Assembler, Publisher, RecoveryReport, recover
from grok_pacs.ingest.listener import Listener
from grok_pacs.ingest.reaper import Reaper
from grok_pacs.ingest.uploader import Uploader
from grok_pacs.ops import audit, drift
from grok_pacs.store.files import atomic_write_bytes
from grok_pacs.store.index import StudyIndex
from grok_pacs.store.register import ResultRegister
from grok_pacs.store.retention import Retention, RetentionLoop
from grok_pacs.store.storage import open_blob_store
from grok_pacs.store.uploads import Uploads

log = logging.getLogger("grok_pacs.ingest.service")

NODE_FILE = "node_id"  # in the data directory: the node_id its instances were received under


def check_node_id(settings: Settings) -> None:
    """With a server database keep a data directory's listener name across restarts, or refuse to start.

    Its rows carry `node_id`, and only the listener of that name recovers and uploads them: one restarted
    under another name (a container whose host name changed) would leave its LOCAL instances un-uploaded
    and their studies waiting for ever. The first start records the name; the embedded SQLite file is one
    host's and is not scoped by name.
    """
    if not settings.resolved_database_url.startswith("postgresql"):
        return
    marker = settings.data_dir / NODE_FILE
    if not marker.exists():
        atomic_write_bytes(settings.data_dir, marker, settings.node_id.encode())
        return
    recorded = marker.read_text().strip()
    if recorded != settings.node_id:
        raise SettingsError(
            f"node_id: the data directory {settings.data_dir} holds the instances of listener {recorded!r}, "
            f"not {settings.node_id!r}; set GROK_PACS_NODE_ID={recorded} (only that name uploads and recovers them)"
        )


class ClosablePublisher(Publisher, Protocol):
    """What the service needs of its publisher: publish jobs, and be closed when the service stops."""

    def close(self) -> None: ...


def _uploader(settings: Settings, index: StudyIndex) -> Uploader | None:
    """The uploader into the object store `storage_url` names; None without one (one box)."""
    if settings.storage_url is None:
        return None
    # Polled as often as assembly looks for quiet studies: an upload mostly overlaps the quiet period.
    interval = min(1.0, max(0.05, settings.quiet_period / 4))
    uploads = Uploads(index.engine, node_id=settings.node_id)
    return Uploader(settings.data_dir, uploads, open_blob_store(settings), interval=interval)


class IngestService:
    """Start with `start()`, stop with `stop()`; `port` is the bound DICOM port."""

    def __init__(self, settings: Settings, publisher: ClosablePublisher) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        check_node_id(settings)
        self.index = StudyIndex(settings.resolved_database_url, node_id=settings.node_id)
        self.publisher = publisher
        self.listener = Listener(settings, self.index)
        self.uploader = _uploader(settings, self.index)
        # With an object store, a study is complete only once all its instances are in it.
        waiting = self.uploader.uploads.studies_waiting if self.uploader is not None else None
        self.assembler = Assembler(settings, self.index, self.publisher, waiting=waiting)
        self.reaper = Reaper(settings, self.index, self.publisher)
        store = self.uploader.store if self.uploader is not None else None
        self.retention = RetentionLoop(Retention(settings, self.index.engine, store))
        self.recovery: RecoveryReport | None = None
        self.drift: drift.DriftMonitor | None = None

    @property
    def port(self) -> int:
        return self.listener.port

    def start(self) -> None:
        """Recover (before any association can write), then listen, then assemble."""
        uploaded = self.uploader.uploads.uploaded_paths() if self.uploader is not None else set()
        self.recovery = recover(self.settings, self.index, frozenset(uploaded))
        audit.configure(self.settings)  # before the listener: its threads audit what they receive
        self.listener.start()
        if self.uploader is not None:
            self.uploader.start()
        self.assembler.start()
        self.reaper.start()
        self.retention.start()
        self.drift = drift.maybe_start(self.settings, ResultRegister(self.index.engine))  # /metrics drift figures
        audit.application_started("listener")

    def stop(self) -> None:
        self.listener.stop()
        audit.application_stopped("listener")
        if self.uploader is not None:
            self.uploader.stop()
            self.uploader.store.close()
        self.assembler.stop()
        self.reaper.stop()
        self.retention.stop()
        if self.drift is not None:
            self.drift.stop()
        self.publisher.close()
        self.index.close()

    def __enter__(self) -> IngestService:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
