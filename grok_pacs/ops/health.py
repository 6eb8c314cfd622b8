"""Health checks an orchestrator can act on: listener up, database, broker and object store reachable,
bundle loaded, disk headroom.

`HealthChecker.report()` runs the checks of a role and returns a JSON-ready dict; the metrics server
(`grok_pacs.ops.metrics`) answers /health with it, HTTP 200 when every check passes and 503 otherwise, so a
Kubernetes readiness probe or a compose healthcheck sees the same verdict an operator reads.
"""

from __future__ import annotations

import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy
from kombu import Connection

from grok_pacs.config import Settings, broker_ssl_options

CHECK_TIMEOUT = 3.0  # seconds any one network check may take: probes must answer quickly
STORAGE_CHECK_TIMEOUT = 1.0  # per attempt
STORAGE_CHECK_ATTEMPTS = 2  # botocore "standard" retries: a probe answers within a few seconds
ROLES = ("listener", "worker", "serve")


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str


Check = Callable[[], CheckResult]


class BundleState:
    """Which model bundle this process has loaded, or why loading it failed.

    The worker marks a load through `metrics.model_loaded` and a failed load with `mark_failed`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._path: Path | None = None
        self._version = ""
        self._error = ""

    def mark_loaded(self, path: Path, version: str = "") -> None:
        with self._lock:
            self._path, self._version, self._error = Path(path), version, ""

    def mark_failed(self, error: str) -> None:
        with self._lock:
            self._path, self._version, self._error = None, "", error

    def clear(self) -> None:
        with self._lock:
            self._path, self._version, self._error = None, "", ""

    def loaded(self) -> tuple[Path | None, str]:
        with self._lock:
            return self._path, self._version

    def error(self) -> str:
        with self._lock:
            return self._error


BUNDLE_STATE = BundleState()


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem holding `path`, or None when `path` does not exist."""
    try:
        return shutil.disk_usage(path).free
    except FileNotFoundError:
        return None


def _local_host(bind_address: str) -> str:
    """The address to reach a server bound to `bind_address` from this host."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(bind_address, bind_address)


def listener_check(settings: Settings) -> Check:
    """The DICOM port accepts TCP connections (the listener's accept loop is alive)."""
    host = _local_host(settings.bind_address)

    def check() -> CheckResult:
        try:
            with socket.create_connection((host, settings.port), timeout=CHECK_TIMEOUT):
                pass
        except OSError as exc:
            return CheckResult(False, f"DICOM port {host}:{settings.port} refuses connections: {exc}")
        return CheckResult(True, f"DICOM port {host}:{settings.port} accepts connections")

    return check


def _redacted(url: str) -> str:
    """A broker or database URL without its credentials (user:password@, ?password=), for messages."""
    url = re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", url)
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0]


def _open_broker(url: str, tls: dict[str, Any] | None = None) -> None:
    """Open the broker for real: kombu's SQLAlchemy transport connects lazily, so query it directly."""
    if url.startswith("sqla+"):
        db_url = url.removeprefix("sqla+")
        args = {"timeout": CHECK_TIMEOUT} if db_url.startswith("sqlite") else {}
        engine = sqlalchemy.create_engine(db_url, connect_args=args)
        try:
            with engine.connect() as db:
                db.exec_driver_sql("SELECT 1")
        finally:
            engine.dispose()
        return
    with Connection(url, connect_timeout=CHECK_TIMEOUT, ssl=tls or False) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=CHECK_TIMEOUT)
        _ = conn.default_channel  # opens a channel: Redis answers PING here


def broker_check(settings: Settings) -> Check:
    """A connection to the Celery broker can be opened (Redis answers PING, SQLite opens)."""
    url = settings.resolved_broker_url
    tls = broker_ssl_options(settings)

    def check() -> CheckResult:
        start = time.monotonic()
        try:
            _open_broker(url, tls)
        except Exception as exc:  # noqa: BLE001 - any failure means unreachable; it is reported, not hidden
            return CheckResult(False, f"broker {_redacted(url)} unreachable: {type(exc).__name__}: {_first_line(exc)}")
        return CheckResult(True, f"broker {_redacted(url)} reachable in {time.monotonic() - start:.3f} s")

    return check


def _database_engine(url: str) -> sqlalchemy.Engine:
    """An engine of its own for the probe: one connection, bounded connect and statement time."""
    if url.startswith("sqlite"):
        return sqlalchemy.create_engine(url, connect_args={"timeout": CHECK_TIMEOUT})
    # psycopg: connect_timeout in whole seconds (libpq ignores values below 2); the server cancels a query
    # after statement_timeout, so a database that accepts but stalls still answers the probe in time.
    args = {
        "connect_timeout": max(2, int(CHECK_TIMEOUT)),
        "options": f"-c statement_timeout={int(CHECK_TIMEOUT * 1000)}",
    }
    return sqlalchemy.create_engine(url, connect_args=args, pool_size=1, max_overflow=0, pool_pre_ping=True)


def database_check(settings: Settings) -> Check:
    """The index database answers `SELECT 1` (PostgreSQL, or the embedded SQLite file)."""
    url = settings.resolved_database_url
    engine = _database_engine(url)  # kept between probes: pre-ping replaces a connection the server dropped

    def check() -> CheckResult:
        start = time.monotonic()
        try:
            with engine.connect() as db:
                db.exec_driver_sql("SELECT 1")
        except Exception as exc:  # noqa: BLE001 - any failure means not ready; it is reported, not hidden
            return CheckResult(
                False, f"database {_redacted(url)} unreachable: {type(exc).__name__}: {_first_line(exc)}"
            )
        return CheckResult(True, f"database {_redacted(url)} answered in {time.monotonic() - start:.3f} s")

    return check


def storage_check(settings: Settings) -> Check:
    """The object store answers a HEAD on the bucket (only when storage_url is set). boto3 directly, as
    `grok_pacs.store.s3` configures it: ops sits below store in the layers."""
    import boto3  # slow to import: only processes using a store pay
    from botocore.config import Config

    assert settings.storage_url is not None
    timeout = min(settings.storage_timeout, STORAGE_CHECK_TIMEOUT)
    endpoint = settings.storage_endpoint
    config = Config(
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"mode": "standard", "max_attempts": STORAGE_CHECK_ATTEMPTS},
        s3={"addressing_style": "path"} if endpoint else {},
    )
    session = boto3.session.Session(
        aws_access_key_id=settings.storage_access_key or None,
        aws_secret_access_key=settings.storage_secret_key.get_secret_value() or None,
        region_name=settings.storage_region or None,
    )
    client = session.client("s3", endpoint_url=endpoint or None, config=config)

    def check() -> CheckResult:
        start = time.monotonic()
        try:
            client.head_bucket(Bucket=settings.storage_url.bucket)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready; it is reported, not hidden
            return CheckResult(False, f"object store unreachable: {type(exc).__name__}")
        return CheckResult(True, f"object store {settings.storage_url} answered in {time.monotonic() - start:.3f} s")

    return check


def bundle_check(settings: Settings, state: BundleState = BUNDLE_STATE, require_loaded: bool = False) -> Check:
    """The worker's model bundle is loaded, or (workers load it lazily, on the first job) is there to load.

    A failed load always fails the check. `require_loaded=True` also fails it until the load is done.
    """

    def check() -> CheckResult:
        loaded, version = state.loaded()
        if loaded is not None:
            return CheckResult(True, f"bundle {loaded} loaded" + (f" (version {version})" if version else ""))
        if state.error():
            return CheckResult(False, f"bundle {settings.bundle} failed to load: {state.error()}")
        if settings.bundle is None:
            return CheckResult(False, "no bundle configured: set bundle in the config or GROK_PACS_BUNDLE")
        if not Path(settings.bundle).is_dir():
            return CheckResult(False, f"bundle directory {settings.bundle} does not exist")
        if require_loaded:
            return CheckResult(False, f"bundle {settings.bundle} is not loaded yet")
        return CheckResult(True, f"bundle {settings.bundle} present, not loaded yet (loads on the first job)")

    return check


def disk_check(settings: Settings) -> Check:
    """The data directory has more free space than min_free_disk_mb (below it C-STOREs are refused)."""

    def check() -> CheckResult:
        free = free_bytes(settings.data_dir)
        if free is None:
            return CheckResult(False, f"data directory {settings.data_dir} does not exist")
        free_mb = free // (1024 * 1024)
        if free_mb < settings.min_free_disk_mb:
            return CheckResult(
                False, f"{free_mb} MB free in {settings.data_dir}, below min_free_disk_mb {settings.min_free_disk_mb}"
            )
        return CheckResult(True, f"{free_mb} MB free in {settings.data_dir} (minimum {settings.min_free_disk_mb})")

    return check


class HealthChecker:
    """Named checks run together; the process is healthy when every one passes."""

    def __init__(self, checks: dict[str, Check]) -> None:
        self.checks = checks

    @classmethod
    def for_role(cls, settings: Settings, role: str) -> HealthChecker:
        """The checks that matter for a process: a listener has no bundle, a worker no DICOM port."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        checks: dict[str, Check] = {}
        if role in ("listener", "serve"):
            checks["listener"] = listener_check(settings)
        checks["database"] = database_check(settings)
        checks["broker"] = broker_check(settings)
        if settings.storage_url is not None:
            checks["storage"] = storage_check(settings)
        if role in ("worker", "serve"):
            checks["bundle"] = bundle_check(settings)
        checks["disk"] = disk_check(settings)
        return cls(checks)

    def report(self) -> dict[str, object]:
        """{"status": "ok"|"fail", "checks": {name: {"ok": bool, "detail": str}}}."""
        results = {name: check() for name, check in self.checks.items()}
        return {
            "status": "ok" if all(r.ok for r in results.values()) else "fail",
            "checks": {name: {"ok": r.ok, "detail": r.detail} for name, r in results.items()},
        }
