"""One tiny model bundle for the worker, delivery, round-trip tests and the e2e benchmark.

The bundle is built by the real export path (devtools/tiny_bundle.py). Building takes 15-60 s on a
shared 2-core box, so it is kept under `.cache/grok-bundles/`, keyed by a hash of every source file
that shapes it: any change to the builder, the export code, the model code or the schema rebuilds it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SOURCES = (
    "devtools/tiny_bundle.py",
    "export",
    "grok_pacs/model",
    "grok_pacs/analysis/bundle.py",
    "grok_pacs/model/prompt.py",
    "grok_pacs/domain/biomarkers.py",
    "grok_pacs/domain/labels.py",
    "grok_pacs/analysis/onnx_session.py",
)


def source_key() -> str:
    """sha256 (12 hex) over the bundle's source files, in a stable order."""
    digest = hashlib.sha256()
    for name in _SOURCES:
        path = ROOT / name
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            if file.is_file():
                digest.update(str(file.relative_to(ROOT)).encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def cached_tiny_bundle(cache_root: Path) -> Path:
    """The tiny bundle under `cache_root`, built first if this source version has none."""
    from devtools.tiny_bundle import build_tiny_bundle

    target = Path(cache_root) / f"grok-tiny-bundle-{source_key()}"
    if (target / "manifest.json").is_file():
        return target
    staging = Path(f"{target}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    build_tiny_bundle(staging)
    try:
        os.replace(staging, target)  # atomic: a concurrent session sees a complete bundle or none
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another session finished first; use its copy
    return target


CACHE_ROOT = ROOT / ".cache" / "grok-bundles"  # git-ignored; shared with bench/e2e.py
