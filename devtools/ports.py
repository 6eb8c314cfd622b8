"""Loopback port helpers for the demo, the benchmarks and the tests: one free port, wait until one listens."""

from __future__ import annotations

import socket
import subprocess
import time

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def is_listening(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:`port`."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((LOOPBACK, port)) == 0


def wait_for_port(
    port: int, timeout: float = 30.0, *, proc: subprocess.Popen | None = None, what: str = "a listener"
) -> None:
    """Return once 127.0.0.1:`port` listens; TimeoutError after `timeout` s, RuntimeError if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening")
        if is_listening(port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} does not listen on {LOOPBACK}:{port} after {timeout:.0f} s")
