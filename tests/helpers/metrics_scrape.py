"""Scraping /metrics and /health of real grok-pacs processes: a process run until healthy, Prometheus samples
by name and labels, DCMTK's storescu."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require_tool

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def dcmtk_tool(name: str) -> str:
    """DCMTK's `name` from PATH, skipping same-named programs of other packages (pynetdicom's storescu)."""
    require_tool(name)
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            version = subprocess.run([str(candidate), "--version"], capture_output=True, text=True, timeout=30)
            if "dcmtk" in (version.stdout + version.stderr).lower():
                return str(candidate)
    pytest.fail(f"no DCMTK {name} on PATH (run scripts/install-system-deps.sh)")


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def scrape(port: int) -> Samples:
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not exported; have {sorted(n for n, _ in samples if 'grok' in n)}"
    return samples[key]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def storescu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk_tool("storescu"), *args], capture_output=True, text=True, timeout=60)


@contextmanager
def running(tmp_path: Path, command: str, settings_env: dict[str, str], metrics_port: int) -> Iterator[Path]:
    """`grok-pacs COMMAND` with GROK_PACS_* from `settings_env`, until /health answers 200; SIGTERM after.

    Yields the log file. The process must exit 0 on SIGTERM (a clean shutdown)."""
    env = {**os.environ, **settings_env, "GROK_PACS_METRICS_PORT": str(metrics_port)}
    env.pop("GROK_PACS_CONFIG", None)
    log_path = tmp_path / f"{command}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "grok_pacs.cli", command],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def healthy() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"grok-pacs {command} exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            return get(f"http://127.0.0.1:{metrics_port}/health")[0] == 200
        except OSError:
            return False

    try:
        wait_for(healthy, f"grok-pacs {command} to report healthy", timeout=90)
        yield log_path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    assert proc.returncode == 0, log_path.read_text()[-3000:]
