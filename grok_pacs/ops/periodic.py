"""Background passes that must outlive outages: assembly, upload, the reaper, retention.

`Periodic` runs one pass every `interval` seconds in a daemon thread until `stop()`. A pass that raises is
logged (the exception's type and our own message only: `grok_pacs.ops.phi`) and counted, and the next pass
tries again: a database, broker, object store or disk outage must never end the loop, or the work it does
would silently stop until the process restarts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("grok_pacs.ops.periodic")


class Periodic:
    """`work()` every `interval` s (the first after `first_delay`, default `interval`), until `stop()`."""

    def __init__(
        self,
        name: str,
        work: Callable[[], object],
        interval: float,
        *,
        first_delay: float | None = None,
        stop_event: threading.Event | None = None,
        join_timeout: float = 10.0,
    ) -> None:
        self.name, self.work, self.interval = name, work, interval
        self.first_delay = interval if first_delay is None else first_delay
        self.stopping = stop_event or threading.Event()  # also read by a long pass that should end early
        self.join_timeout = join_timeout
        self.failed_passes = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"grok-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=self.join_timeout)
            self._thread = None

    def _loop(self) -> None:
        delay = self.first_delay
        while not self.stopping.wait(delay):
            delay = self.interval
            try:
                self.work()
            except Exception as exc:  # noqa: BLE001 - an outage must not end the loop; the next pass retries
                self.failed_passes += 1
                log.error("%s pass failed (%s); retrying in %.1f s", self.name, exc, delay)
