"""The observability HTTP server of every grok-pacs process: Prometheus metrics and health checks.

Routes: `/metrics` (`grok_pacs.ops.metrics.REGISTRY`, Prometheus text or OpenMetrics), `/health`
(readiness: JSON, 200 when every check of `grok_pacs.ops.health` passes, 503 otherwise) and
`/health/live` (liveness: 200 while the process serves HTTP). Served on `settings.metrics_port`.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client.exposition import choose_encoder

from grok_pacs.config import Settings
from grok_pacs.ops import health, metrics

log = logging.getLogger(__name__)


class _Handler(BaseHTTPRequestHandler):
    server: ObservabilityServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(HTTPStatus.OK, encoder(metrics.REGISTRY), content_type)
        elif path == "/health":
            report = self.server.checker.report()
            status = HTTPStatus.OK if report["status"] == "ok" else HTTPStatus.SERVICE_UNAVAILABLE
            self._send(status, json.dumps(report).encode(), "application/json")
        elif path == "/health/live":
            self._send(HTTPStatus.OK, json.dumps({"status": "ok"}).encode(), "application/json")
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found: try /metrics, /health or /health/live\n", "text/plain")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (base class signature)
        log.debug("metrics http: " + format, *args)


class ObservabilityServer(ThreadingHTTPServer):
    """Serves /metrics and /health from a daemon thread; `close()` stops it."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], checker: health.HealthChecker) -> None:
        super().__init__(address, _Handler)
        self.checker = checker
        self._thread = threading.Thread(target=self.serve_forever, name="grok-pacs-metrics", daemon=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> ObservabilityServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


def start_server(settings: Settings, role: str, checker: health.HealthChecker | None = None) -> ObservabilityServer:
    """Start the metrics/health server for `role` ("listener", "worker" or "serve") on metrics_port.

    Binds `settings.bind_address` (the listener's address). Raises OSError naming the port when it is
    taken, so a misconfigured second process fails at start rather than running unobserved.
    """
    if settings.metrics_port == 0:
        raise ValueError("metrics_port is 0 (off); set GROK_PACS_METRICS_PORT to serve metrics")
    metrics.watch_data_dir(settings.data_dir)
    checker = checker or health.HealthChecker.for_role(settings, role)
    try:
        server = ObservabilityServer((settings.bind_address, settings.metrics_port), checker)
    except OSError as exc:
        raise OSError(
            exc.errno, f"metrics_port {settings.metrics_port} on {settings.bind_address}: {exc.strerror}"
        ) from exc
    log.info("metrics and health on http://%s:%d/metrics", settings.bind_address, server.port)
    return server.start()


def maybe_start_server(settings: Settings, role: str) -> ObservabilityServer | None:
    """`start_server` when metrics_port is set, else None: the call every entry point makes."""
    return start_server(settings, role) if settings.metrics_port else None
