"""The ingest service: recovery, then the C-STORE listener and the assembly loop, in one process.

This is what `grok-pacs listen` runs; the demo and tests start it in-process the same way.
"""

from __future__ import annotations

import logging

from grok_pacs.ingest.assembly import Assembler, RecoveryReport, recover
from grok_pacs.config import Settings
from grok_pacs.store.index import StudyIndex
from grok_pacs.ingest.listener import Listener
from grok_pacs.jobs.publisher import JobPublisher

log = logging.getLogger("grok_pacs.ingest.service")


class IngestService:
    """Start with `start()`, stop with `stop()`; `port` is the bound DICOM port."""

    def __init__(self, settings: Settings, publisher: JobPublisher | None = None) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.index = StudyIndex(settings.index_path)
        self.publisher = publisher or JobPublisher(settings)
        self.listener = Listener(settings, self.index)
        self.assembler = Assembler(settings, self.index, self.publisher)
        self.recovery: RecoveryReport | None = None

    @property
    def port(self) -> int:
        return self.listener.port

    def start(self) -> None:
        """Recover (before any association can write), then listen, then assemble."""
        self.recovery = recover(self.settings, self.index)
        self.listener.start()
        self.assembler.start()

    def stop(self) -> None:
        self.listener.stop()
        self.assembler.stop()
        self.publisher.close()
        self.index.close()

    def __enter__(self) -> "IngestService":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
