"""The observability HTTP server of every grok-pacs process: Prometheus metrics and health checks.

Routes: `/metrics` (`grok_pacs.ops.metrics.REGISTRY`, Prometheus text or OpenMetrics), `/health`
(readiness: JSON, 200 when every check of `grok_pacs.ops.health` passes, 503 otherwise) and
`/health/live` (liveness: 200 while the process serves HTTP). Served on `settings.metrics_port` at
`settings.metrics_bind_address` (loopback unless set: apart from the DICOM address).

With `metrics_token` set, /metrics needs `Authorization: Bearer TOKEN` (401 otherwise) and /health gives
its details (which name hosts, paths and errors) only with it; without the token /health still answers
200/503 with {"status"} alone, so orchestrator probes need no secret. A request has REQUEST_TIMEOUT_S per
read and REQUEST_DEADLINE_S in all, and at most MAX_CONNECTIONS are served at once (more are closed), so
slow or idle clients cannot hold the server.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client.exposition import choose_encoder

from grok_pacs.config import Settings
from grok_pacs.ops import health, metrics

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0  # seconds a client may stay silent while we read its request
REQUEST_DEADLINE_S = 30.0  # a connection is cut this long after it was accepted (health checks take < 10 s)
MAX_CONNECTIONS = 32  # connections served at once; Prometheus and probes need a handful


class _Handler(BaseHTTPRequestHandler):
    server: ObservabilityServer

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # StreamRequestHandler sets it on the socket
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        authorized = self._authorized()
        if path == "/metrics":
            if not authorized:
                self._unauthorized()
                return
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(HTTPStatus.OK, encoder(metrics.REGISTRY), content_type)
        elif path == "/health":
            report = self.server.checker.report()
            status = HTTPStatus.OK if report["status"] == "ok" else HTTPStatus.SERVICE_UNAVAILABLE
            shown = report if authorized else {"status": report["status"]}
            self._send(status, json.dumps(shown).encode(), "application/json")
        elif path == "/health/live":
            self._send(HTTPStatus.OK, json.dumps({"status": "ok"}).encode(), "application/json")
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found: try /metrics, /health or /health/live\n", "text/plain")

    def _authorized(self) -> bool:
        token = self.server.token
        if not token:
            return True
        offered = self.headers.get("Authorization", "")
        return hmac.compare_digest(offered.encode(), f"Bearer {token}".encode())  # constant time

    def _unauthorized(self) -> None:
        self.send_response(HTTPStatus.UNAUTHORIZED)
        self.send_header("WWW-Authenticate", 'Bearer realm="grok-pacs metrics"')
        body = b"401: send Authorization: Bearer <metrics_token>\n"
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

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

    def __init__(self, address: tuple[str, int], checker: health.HealthChecker, token: str = "") -> None:
        super().__init__(address, _Handler)
        self.checker = checker
        self.token = token
        self.request_timeout = REQUEST_TIMEOUT_S
        self.request_deadline = REQUEST_DEADLINE_S
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._thread = threading.Thread(target=self.serve_forever, name="grok-pacs-metrics", daemon=True)

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        if not self._slots.acquire(blocking=False):
            log.warning("metrics http: %d connections open, closing one from %s", MAX_CONNECTIONS, client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        deadline = threading.Timer(self.request_deadline, _cut, (request,))
        deadline.daemon = True
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self._slots.release()

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


def _cut(request: socket.socket) -> None:
    """End a connection past its deadline: the handler's blocked read or write returns and it finishes."""
    try:
        request.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed by the handler: nothing left to cut
        pass


def start_server(settings: Settings, role: str, checker: health.HealthChecker | None = None) -> ObservabilityServer:
    """Start the metrics/health server for `role` ("listener", "worker" or "serve") on metrics_port.

    Binds `settings.metrics_bind_address`. Raises OSError naming the port when it is taken, so a
    misconfigured second process fails at start rather than running unobserved.
    """
    if settings.metrics_port == 0:
        raise ValueError("metrics_port is 0 (off); set GROK_PACS_METRICS_PORT to serve metrics")
    metrics.watch_data_dir(settings.data_dir)
    checker = checker or health.HealthChecker.for_role(settings, role)
    address = settings.metrics_bind_address
    token = settings.metrics_token.get_secret_value()
    try:
        server = ObservabilityServer((address, settings.metrics_port), checker, token)
    except OSError as exc:
        raise OSError(exc.errno, f"metrics_port {settings.metrics_port} on {address}: {exc.strerror}") from exc
    log.info("metrics and health on http://%s:%d/metrics%s", address, server.port, " (token)" if token else "")
    return server.start()


def maybe_start_server(settings: Settings, role: str) -> ObservabilityServer | None:
    """`start_server` when metrics_port is set, else None: the call every entry point makes."""
    return start_server(settings, role) if settings.metrics_port else None
