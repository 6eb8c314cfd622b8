"""/health readiness follows the database and the object store (real PostgreSQL, real SeaweedFS); /metrics takes
a bearer token; the server binds metrics_bind_address, apart from the DICOM address; idle clients are cut off.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from devtools.ports import free_port
from grok_pacs.config import Settings, load_settings
from grok_pacs.ops import health, observability

TOKEN = "probe-token-7f3a"


def get(url: str, token: str = "") -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _settings(tmp_path: Path, **values) -> Settings:
    """A worker's settings whose only checks that can fail are the database's and the store's."""
    bundle = tmp_path / "bundle"
    bundle.mkdir(parents=True, exist_ok=True)  # present, loaded on the first job: the bundle check passes
    return load_settings(data_dir=tmp_path / "data", bundle=bundle, min_free_disk_mb=0, metrics_port=free_port(),
                         **values)  # fmt: skip


@contextmanager
def serving(settings: Settings) -> Iterator[str]:
    (settings.data_dir).mkdir(parents=True, exist_ok=True)
    server = observability.start_server(settings, "worker")
    try:
        yield f"http://{settings.metrics_bind_address}:{server.port}"
    finally:
        server.close()


def test_health_follows_the_database(tmp_path: Path, postgres) -> None:
    settings = _settings(tmp_path, database_url=postgres.new_database())
    with serving(settings) as url:
        status, body = get(f"{url}/health")
        report = json.loads(body)
        assert status == 200, report
        assert report["checks"]["database"]["ok"] and "storage" not in report["checks"]
        postgres.stop()
        try:
            status, body = get(f"{url}/health")
        finally:
            postgres.start()
        report = json.loads(body)
        assert status == 503 and not report["checks"]["database"]["ok"], report
        assert "database postgresql+psycopg://***@127.0.0.1" in report["checks"]["database"]["detail"]
        assert get(f"{url}/health")[0] == 200, "back when the database is"


def test_health_names_a_closed_database_port_without_its_password(tmp_path: Path) -> None:
    closed = free_port()
    settings = _settings(tmp_path, database_url=f"postgresql+psycopg://grok:pw-never-shown@127.0.0.1:{closed}/grok")
    with serving(settings) as url:
        status, body = get(f"{url}/health")
    detail = json.loads(body)["checks"]["database"]["detail"]
    assert status == 503 and detail.startswith(f"database postgresql+psycopg://***@127.0.0.1:{closed}/grok unreachable")
    assert b"pw-never-shown" not in body


def test_health_follows_the_object_store(tmp_path: Path, seaweedfs) -> None:
    from devtools.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY

    store = {"storage_url": f"s3://{BUCKET}", "storage_access_key": ACCESS_KEY, "storage_secret_key": SECRET_KEY}
    up = _settings(tmp_path / "up", storage_endpoint=seaweedfs.endpoint, **store)
    with serving(up) as url:
        status, body = get(f"{url}/health")
    assert status == 200 and json.loads(body)["checks"]["storage"]["ok"], body
    down = _settings(tmp_path / "down", storage_endpoint=f"http://127.0.0.1:{free_port()}", **store)
    with serving(down) as url:
        status, body = get(f"{url}/health")
    storage = json.loads(body)["checks"]["storage"]
    assert status == 503 and not storage["ok"] and storage["detail"].startswith("object store unreachable"), body
    assert SECRET_KEY.encode() not in body


def test_metrics_token_and_bind_address(tmp_path: Path) -> None:
    settings = _settings(tmp_path, metrics_token=TOKEN, metrics_bind_address="127.0.0.2", bind_address="0.0.0.0")
    with serving(settings) as url:
        assert url.startswith("http://127.0.0.2:")
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(ConnectionRefusedError):  # bound to 127.0.0.2 only, not the DICOM 0.0.0.0
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert get(f"{url}/metrics")[0] == 401
        assert get(f"{url}/metrics", token="wrong")[0] == 401
        status, body = get(f"{url}/metrics", token=TOKEN)
        assert status == 200 and b"grok_pacs_" in body
        # Probes need no token: the verdict only; the details (hosts, paths, errors) with the token.
        status, body = get(f"{url}/health")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        assert "database" in json.loads(get(f"{url}/health", token=TOKEN)[1])["checks"]
        assert get(f"{url}/health/live")[0] == 200


def test_default_binds_loopback_and_idle_clients_are_cut_off(tmp_path: Path) -> None:
    settings = _settings(tmp_path, bind_address="0.0.0.0")
    assert settings.metrics_bind_address == "127.0.0.1"
    checker = health.HealthChecker({"ok": lambda: health.CheckResult(True, "fine")})
    server = observability.start_server(settings, "worker", checker=checker)
    server.request_timeout = 0.5  # the default is seconds; a slow test would only wait longer
    try:
        assert server.server_address[0] == "127.0.0.1"
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(4)]
        # Silent clients hold nothing up, and each is closed by the server (recv sees the end, not our timeout).
        assert get(f"http://127.0.0.1:{server.port}/health")[0] == 200
        for client in idle:
            assert client.recv(1024) == b""
            client.close()
    finally:
        server.close()
