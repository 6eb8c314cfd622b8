"""Adding one file to a built bundle: what training's later fits (calibration, quality head, OOD check,
estimate errors) write after the bundle exists.

`add_file` extends only a bundle that verifies, writes the file, lists it in the manifest under its own
entry with its sha256 and size (and sets a new version when given), and verifies the bundle again, so a
bundle is never left half-extended without the runtime's check saying so.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from grok_pacs.analysis.bundle import MANIFEST, load_bundle, sha256_file


def add_file(
    bundle_dir: str | Path,
    name: str,
    write: Callable[[Path], Any],
    entry_key: str,
    entry: Mapping[str, Any],
    version: str | None = None,
) -> Path:
    """Write `name` into the bundle through `write(path)`; the manifest gains `entry_key: {"file": name,
    **entry}` and the file's hash. Returns the file's path."""
    root = Path(bundle_dir)
    load_bundle(root)  # only a verified bundle is extended
    path = root / name
    write(path)
    manifest_path = root / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest[entry_key] = {"file": name, **entry}
    manifest["files"][name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    if version is not None:
        manifest["version"] = version
    manifest_path.write_text(json.dumps(manifest, indent=2))
    load_bundle(root)  # the runtime's verification, again
    return path
