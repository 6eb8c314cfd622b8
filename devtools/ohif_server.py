"""The OHIF viewer served locally, and Orthanc's DICOMweb behind it, from one origin (no CORS).

`scripts/fetch-ohif.sh` puts the built viewer (`@ohif/app` from npm) under `.cache/ohif/`; this server
serves that `dist/` with our `devtools/ohif/app-config.js` in place of the packaged one (which points at a
remote demo server), and forwards `/dicom-web/...` and `/wado` to Orthanc. Any other path that is not a
file is the single-page app's own route (`/viewer?StudyInstanceUIDs=...`) and gets `index.html`.

    python -m devtools.ohif_server --orthanc http://127.0.0.1:8042 --port 3000
"""

from __future__ import annotations

import argparse
import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
OHIF_VERSION = "3.13.2"
OHIF_DIST = ROOT / ".cache" / "ohif" / OHIF_VERSION / "dist"
APP_CONFIG = Path(__file__).resolve().parent / "ohif" / "app-config.js"
PROXIED = ("/dicom-web/", "/wado")
# Types Python's mimetypes may not know; a wasm codec served as text/plain fails to compile in the browser.
CONTENT_TYPES = {
    ".js": "application/javascript",
    ".mjs": "application/javascript",
    ".wasm": "application/wasm",
    ".css": "text/css",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".map": "application/json",
    ".xml": "application/xml",
}


def orthanc_query(query: str) -> str:
    """The query string as Orthanc's DICOMweb 1.7 understands it.

    OHIF sends `includefield=a%2Cb`; Orthanc 1.7 does not split an encoded comma and then returns no study
    description, so the commas are decoded (UIDs and tag keywords never contain one otherwise).
    """
    return query.replace("%2C", ",").replace("%2c", ",")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = urlsplit(self.path).path
        if path.startswith(PROXIED):
            self._proxy()
        elif path == "/app-config.js":
            self._send_file(APP_CONFIG)
        else:
            self._send_static(path)

    def _proxy(self) -> None:
        parts = urlsplit(self.path)
        target = parts.path + (f"?{orthanc_query(parts.query)}" if parts.query else "")
        upstream = http.client.HTTPConnection(self.server.orthanc.hostname, self.server.orthanc.port, timeout=120)
        try:
            # The browser's Host goes on so that Orthanc writes BulkDataURIs under this origin, not its own port.
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "host", "range")}
            upstream.request("GET", target, headers=headers)
            response = upstream.getresponse()
            body = response.read()
        except OSError as exc:  # Orthanc down or gone: the viewer shows a failed request, the log says why
            self.send_error(502, f"Orthanc at {self.server.orthanc.netloc} did not answer: {exc}")
            return
        finally:
            upstream.close()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "keep-alive"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_static(self, path: str) -> None:
        dist = self.server.dist.resolve()
        candidate = (dist / path.lstrip("/")).resolve()
        if not candidate.is_relative_to(dist):  # `..` in the path: never serve outside dist
            self.send_error(404)
            return
        self._send_file(candidate if candidate.is_file() else dist / "index.html")

    def _send_file(self, file: Path) -> None:
        body = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPES.get(file.suffix, "application/octet-stream"))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (base class signature)
        if self.server.log_path is not None:
            with open(self.server.log_path, "a") as log:
                log.write(f"{self.address_string()} {format % args}\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, dist: Path, orthanc_url: str, log_path: Path | None) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.dist, self.orthanc, self.log_path = dist, urlsplit(orthanc_url), log_path


class OhifServer:
    """The viewer on 127.0.0.1:`port`, with Orthanc's DICOMweb at `orthanc_url` behind /dicom-web."""

    def __init__(self, orthanc_url: str, port: int, dist: Path = OHIF_DIST, log_path: Path | None = None) -> None:
        if not (dist / "index.html").is_file():
            raise FileNotFoundError(f"no OHIF build at {dist} (run scripts/fetch-ohif.sh, part of `make setup`)")
        if not orthanc_url.startswith("http://"):
            raise ValueError(f"orthanc_url must be http://host:port, got {orthanc_url!r}")
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._server = _Server(port, dist, orthanc_url, log_path)
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif-server", daemon=True)

    def start(self) -> OhifServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def study_url(self, study_uid: str) -> str:
        """The viewer opened on one study (OHIF's basic viewer mode)."""
        return f"{self.url}/viewer?StudyInstanceUIDs={study_uid}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orthanc", required=True, help="Orthanc's HTTP root, e.g. http://127.0.0.1:8042")
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args()
    server = OhifServer(args.orthanc, args.port)
    print(f"OHIF viewer on {server.url} (Ctrl-C stops)", flush=True)
    try:
        server._server.serve_forever()
    except KeyboardInterrupt:
        server._server.server_close()


if __name__ == "__main__":
    main()
