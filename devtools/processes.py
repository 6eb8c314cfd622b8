"""Real processes for worker tests and the e2e benchmark: redis-server, `grok-pacs worker` / `serve` subprocesses,
DCMTK storescu.

Everything binds 127.0.0.1 on free ports; every wait is bounded; processes are stopped by their own pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import SecretStr

from devtools.ports import free_port, wait_for_port
from devtools.tools import require_tool

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll `predicate` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Redis:
    """A throw-away redis-server (no persistence) on a loopback port (a free one unless given)."""

    def __init__(self, work_dir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc = subprocess.Popen(
            [
                require_tool("redis-server"),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(work_dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def _plain(value: object) -> str:
    """A setting's value as its variable holds it (a SecretStr's str() is '**********')."""
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)


def grok_env(**settings: object) -> dict[str, str]:
    """The environment of a grok-pacs subprocess: GROK_PACS_<NAME> for each setting, one BLAS thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GROK_PACS_")}
    env.update({f"GROK_PACS_{name.upper()}": _plain(value) for name, value in settings.items() if value is not None})
    env.update(
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1"
    )
    return env


class GrokProcess:
    """`python -m grok_pacs.cli.main <command>` with the given environment, output to a log file."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path, self.env = log_path, env  # env: for other commands against the same data directory
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "grok_pacs.cli", *command],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[1],
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, marker: str, timeout: float = 120.0) -> None:
        """Wait for `marker` in the log (e.g. Celery's 'ready.'); fail with the log if it exits first."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"process exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            return marker in self.log()

        wait_until(ready, timeout, f"{marker!r} in {self.log_path}", interval=0.2)

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


def storescu(port: int, files: list[Path], called_ae: str = "GROK_PACS", calling_ae: str = "MODALITY") -> None:
    """Send files with DCMTK storescu (a real modality's client); fails on a non-zero exit."""
    proc = subprocess.run(
        [require_tool("storescu"), "-aec", called_ae, "-aet", calling_ae, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"storescu failed: {proc.stdout}\n{proc.stderr}"
