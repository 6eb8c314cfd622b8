"""External tools (DCMTK, redis-server, dciodvfy, Orthanc) that the demo, benchmarks and tests run."""

from __future__ import annotations

import shutil


class MissingToolError(RuntimeError):
    """A required executable is not on PATH; the message says how to install it."""


def require_tool(name: str) -> str:
    """Path of an executable that must be installed; raises MissingToolError (never a silent skip)."""
    path = shutil.which(name)
    if path is None:
        raise MissingToolError(f"required tool {name!r} is not installed (run scripts/install-system-deps.sh)")
    return path
