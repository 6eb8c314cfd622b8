"""External tools (DCMTK, redis-server, dciodvfy, Orthanc, SeaweedFS' weed) that the demo, benchmarks and tests run."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

INSTALL_HINT = "run scripts/install-system-deps.sh"


class MissingToolError(RuntimeError):
    """A required executable is not on PATH; the message says how to install it."""


def require_tool(name: str, hint: str = INSTALL_HINT) -> str:
    """Path of an executable that must be installed; raises MissingToolError (never a silent skip).

    Looks on PATH, then beside this Python (a virtual environment's bin/, where pip puts wheels' binaries).
    """
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        raise MissingToolError(f"required tool {name!r} is not installed ({hint})")
    return path
