"""A receiver that keeps nothing, for bench/ingest.py's `pynetdicom-null` target: what a pynetdicom receiver
costs before any durability.

It is `grok-pacs listen`'s own Listener (the same AE, presentation contexts, fast path and streamed receive
into `<data>/tmp/`), with a C-STORE handler that deletes the received file and answers Success: no header
check, no fsync, no rename, no index row. Its rate bounds every receiver built on pynetdicom in Python on
this machine, so grok-pacs / floor can be read against pynetdicom-null / floor. Never a receiver for data.
Usage: python -m bench.null_scp PORT DATA_DIR
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from grok_pacs.config import load_settings
from grok_pacs.ingest.listener import Listener
from grok_pacs.store.index import StudyIndex


class NullListener(Listener):
    """The listener with its storing step replaced by a delete: Success for every complete dataset."""

    def _store(self, path: Path, request, calling_ae: str, stats) -> int:
        os.unlink(path)
        return 0x0000


def main() -> int:
    port, data_dir = int(sys.argv[1]), Path(sys.argv[2])
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = load_settings(None, port=port, data_dir=str(data_dir), bind_address="127.0.0.1", min_free_disk_mb=100)
    listener = NullListener(settings, StudyIndex(settings.resolved_database_url))
    listener.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    listener.stop(grace=1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
