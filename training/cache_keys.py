"""Cache keys for the training pipeline: a step's resolved configuration plus the source of its code.

A cached step is reused only when nothing that could change its output changed: the configuration it
resolves to (whole dataclasses, not a few chosen fields, so editing a preset re-runs the step) and the text
of the modules that build it (so a code change re-runs it too). Modules are named, not imported: the key
of a step is computed without loading torch or the step's dependencies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SOURCE_SUFFIXES = (".py", ".yaml", ".json")


def _root(name: str) -> Path:
    """The folder holding the top-level package of `name` (the repository root for this project)."""
    spec = importlib.util.find_spec(name.split(".")[0].split("/")[0])
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"cache key: no package named {name.split('.')[0]!r}")
    return Path(spec.origin).parent.parent


def module_files(name: str) -> list[Path]:
    """The files of a module, of every module and data file under a package, or under a data folder.

    `name` is a module ("training.stage1"), a package ("training.stage2") or a folder inside a package
    written as a path ("training/data").
    """
    if "/" in name:
        folder = _root(name) / name
        if not folder.is_dir():
            raise FileNotFoundError(f"cache key: no folder {folder}")
    else:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"cache key: no module named {name!r}")
        origin = Path(spec.origin)
        if origin.name != "__init__.py":
            return [origin]
        folder = origin.parent
    return sorted(p for p in folder.rglob("*") if p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts)


def source_digest(modules: Iterable[str]) -> str:
    """sha256 over the named modules' files (path relative to their package root, then content)."""
    digest = hashlib.sha256()
    for name in sorted(set(modules)):
        root = _root(name)
        for path in module_files(name):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def plain(value: Any) -> Any:
    """A JSON-ready copy of a configuration: dataclasses as dicts, tuples as lists, paths as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def step_key(version: int, step: str, config: Any, modules: Iterable[str], parents: Iterable[str]) -> str:
    """The short hash naming a step's cache folder."""
    text = json.dumps([version, step, plain(config), source_digest(modules), list(parents)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
