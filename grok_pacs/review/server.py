"""Serving the review page with waitress (a production WSGI server): in a background thread of `grok-pacs
serve` (`ReviewServer.start`/`stop`) or in the foreground of `grok-pacs review` (`run_review`).

Both need a way to have a queued result sent: `serve` and `review` pass the broker's delivery job
(grok_pacs.jobs.publisher.JobPublisher.publish_delivery), so the verified SR or rejection note goes out
through the same outbox and sender as the AI's results, exactly once.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from waitress.server import create_server

from grok_pacs.config import Settings, SettingsError
from grok_pacs.ops import audit
from grok_pacs.review.accounts import Accounts
from grok_pacs.review.actions import Deliver, Reviews
from grok_pacs.review.app import create_app
from grok_pacs.store import db
from grok_pacs.store.index import StudyIndex
from grok_pacs.store.storage import open_blob_store

log = logging.getLogger("grok_pacs.review.server")

THREADS = 4  # concurrent requests; a page answers in milliseconds (bench/review.py)


class ReviewServer:
    """The review page on review_bind_address:review_port, in its own thread until `stop`."""

    def __init__(self, settings: Settings, deliver: Deliver) -> None:
        if not settings.review_port:
            raise SettingsError("review_port: 0 turns the review page off; give it a port")
        self.settings = settings
        self.engine = db.open_engine(settings.resolved_database_url)
        store = open_blob_store(settings) if settings.storage_url is not None else None
        self.accounts = Accounts(self.engine)
        self.reviews = Reviews(settings, self.engine, store, deliver)
        self.index = StudyIndex(self.engine, settings.node_id)
        app = create_app(settings, self.reviews, self.accounts, self.index)
        self.server = create_server(
            app,
            host=settings.review_bind_address,
            port=settings.review_port,
            threads=THREADS,
            ident="grok-pacs",
            clear_untrusted_proxy_headers=True,
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.settings.review_bind_address
        return f"http://{f'[{host}]' if ':' in host else host}:{self.settings.review_port}"

    def start(self) -> ReviewServer:
        self.reviews.requeue_missing(self.accounts.get)
        self._thread = threading.Thread(target=self.server.run, name="review-http", daemon=True)
        self._thread.start()
        audit.application_started("review")
        log.info("review page: %s", self.url)
        return self

    def run(self) -> None:
        """Serve in this thread until SIGTERM/SIGINT."""

        def _stop(signum: int, _frame: FrameType | None) -> None:
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, _stop)
        self.reviews.requeue_missing(self.accounts.get)
        audit.application_started("review")
        log.info("review page: %s", self.url)
        try:
            self.server.run()
        except KeyboardInterrupt:
            pass  # SIGTERM or Ctrl-C: a clean stop
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.stop()
            log.info("review page stopped")

    def stop(self) -> None:
        # waitress has no stop call: let the worker threads finish their requests, then close every channel
        # (listener, connections, the trigger) inside the loop's own thread, which then returns.
        self.server.task_dispatcher.shutdown()
        if self._thread is not None:
            self.server.trigger.pull_trigger(self._close_channels)
            self._thread.join(timeout=10)
            self._thread = None
        else:
            self._close_channels()
        audit.application_stopped("review")
        self.engine.dispose()

    def _close_channels(self) -> None:
        for channel in list(self.server._map.values()):
            channel.close()
