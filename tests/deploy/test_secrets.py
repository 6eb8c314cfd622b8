"""Secrets: read from GROK_PACS_<NAME>_FILE, never shown by repr, errors, health details or logs; the broker over
TLS with a password (a real `redis-server --tls-port` with certificates from tests/ingest/test_ingest_tls.py).
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection

from devtools.ports import free_port, wait_for_port
from grok_pacs.config import Settings, SettingsError, load_settings
from grok_pacs.jobs.app import broker_ssl_options, create_app
from grok_pacs.ops import health
from tests.conftest import require_tool
from tests.ingest.test_ingest_tls import pki  # noqa: F401 - a fixture used by name

DB_PASSWORD = "db-pw-4b1d"
REDIS_PASSWORD = "redis-pw-9c2e"
S3_SECRET = "s3-secret-77aa"
TOKEN = "metrics-token-0e5f"


def _secret_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, closed: int) -> None:
    values = {
        "DATABASE_URL": f"postgresql+psycopg://grok:{DB_PASSWORD}@127.0.0.1:{closed}/grok\n",
        "BROKER_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{closed}/0\n",
        "STORAGE_ACCESS_KEY": "grok-key",
        "STORAGE_SECRET_KEY": S3_SECRET,
        "METRICS_TOKEN": TOKEN,
    }
    for name, value in values.items():
        (tmp_path / name.lower()).write_text(value)
        monkeypatch.setenv(f"GROK_PACS_{name}_FILE", str(tmp_path / name.lower()))


def test_secrets_come_from_files_and_beat_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = free_port()
    _secret_files(tmp_path, monkeypatch, closed)
    config = tmp_path / "config.toml"
    config.write_text('database_url = "sqlite:///elsewhere.sqlite"\nstorage_url = "s3://grok"\n')
    settings = load_settings(config, data_dir=tmp_path / "data")
    assert settings.resolved_database_url == f"postgresql+psycopg://grok:{DB_PASSWORD}@127.0.0.1:{closed}/grok"
    assert settings.resolved_broker_url == f"redis://:{REDIS_PASSWORD}@127.0.0.1:{closed}/0"
    assert settings.storage_secret_key.get_secret_value() == S3_SECRET
    assert settings.metrics_token.get_secret_value() == TOKEN
    shown = repr(settings) + str(settings) + settings.model_dump_json()
    for secret in (DB_PASSWORD, REDIS_PASSWORD, S3_SECRET, TOKEN):
        assert secret not in shown


def test_secret_file_errors_name_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GROK_PACS_DATABASE_URL_FILE", str(tmp_path / "missing"))
    with pytest.raises(SettingsError, match="GROK_PACS_DATABASE_URL_FILE: cannot read .*missing"):
        load_settings()
    (tmp_path / "url").write_text(f"postgresql+psycopg://grok:{DB_PASSWORD}@db/grok")
    monkeypatch.setenv("GROK_PACS_DATABASE_URL_FILE", str(tmp_path / "url"))
    monkeypatch.setenv("GROK_PACS_DATABASE_URL", "sqlite:///x.sqlite")
    with pytest.raises(SettingsError, match="GROK_PACS_DATABASE_URL_FILE and GROK_PACS_DATABASE_URL are both set"):
        load_settings()


def test_an_invalid_secret_is_refused_without_being_shown(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings(database_url=f"mysql://grok:{DB_PASSWORD}@db/grok")
    assert "database_url" in str(refused.value) and DB_PASSWORD not in str(refused.value)
    assert DB_PASSWORD not in str(refused.value.__cause__)  # the chained ValidationError hides inputs too


def test_health_details_and_logs_hold_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    closed = free_port()
    _secret_files(tmp_path, monkeypatch, closed)
    caplog.set_level(logging.DEBUG)
    store = {"storage_url": "s3://grok", "storage_endpoint": f"http://127.0.0.1:{closed}"}
    settings = load_settings(data_dir=tmp_path / "data", metrics_port=free_port(), **store)
    report = health.HealthChecker.for_role(settings, "worker").report()
    assert not any(report["checks"][name]["ok"] for name in ("database", "broker", "storage")), report
    from grok_pacs.ops import observability

    observability.start_server(settings, "worker").close()
    shown = json.dumps(report) + caplog.text
    for secret in (DB_PASSWORD, REDIS_PASSWORD, S3_SECRET, TOKEN):
        assert secret not in shown


# --- Redis over TLS with a password ---------------------------------------------------------------------


@pytest.fixture
def tls_redis(tmp_path: Path, pki: Path) -> Iterator[int]:  # noqa: F811
    """redis-server on a TLS-only loopback port, with a password; client certificates not required."""
    port = free_port()
    proc = subprocess.Popen(
        [require_tool("redis-server"), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(pki / "server.crt"), "--tls-key-file", str(pki / "server.key"),
         "--tls-ca-cert-file", str(pki / "ca.crt"), "--tls-auth-clients", "no", "--requirepass", REDIS_PASSWORD,
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_broker_over_tls_with_a_password(tmp_path: Path, tls_redis: int, pki: Path) -> None:  # noqa: F811
    def settings(password: str, ca: Path) -> Settings:
        url = f"rediss://:{password}@127.0.0.1:{tls_redis}/0"
        return load_settings(data_dir=tmp_path, broker_url=url, broker_tls_ca=ca, queue="tls-test")

    good = settings(REDIS_PASSWORD, pki / "ca.crt")
    assert health.broker_check(good)().ok
    app = create_app(good)
    app.send_task("grok_pacs.tasks.analyze_study", args=["1.2.3"], queue="tls-test")
    with Connection(good.resolved_broker_url, ssl=broker_ssl_options(good)) as conn:
        assert conn.default_channel.client.llen("tls-test") == 1, "the job was queued over TLS"

    wrong_password = health.broker_check(settings("not-it", pki / "ca.crt"))()
    assert not wrong_password.ok and REDIS_PASSWORD not in wrong_password.detail
    (tmp_path / "other-ca.crt").write_text((pki / "client.crt").read_text())  # a certificate, but not the CA
    wrong_ca = health.broker_check(settings(REDIS_PASSWORD, tmp_path / "other-ca.crt"))()
    assert not wrong_ca.ok and "certificate verify failed" in wrong_ca.detail, wrong_ca.detail
    with pytest.raises(SettingsError, match="broker_tls_.* need a rediss:// broker_url"):
        load_settings(broker_url="redis://127.0.0.1:6379/0", broker_tls_ca=pki / "ca.crt")
