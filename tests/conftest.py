"""Shared test fixtures. Tools a test needs must be present: a missing tool fails the test, never skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import devtools.tools
from devtools.ports import free_port

# Two cores are shared by everything the suite starts: keep torch/BLAS from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def require_tool(name: str) -> str:
    """Path of an executable the test needs; fails (never skips) when it is missing."""
    try:
        return devtools.tools.require_tool(name)
    except devtools.tools.MissingToolError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def tiny_bundle() -> Path:
    """A complete tiny model bundle built through `export.build_bundle` (devtools/bundle_cache.py caches it
    under .cache/grok-bundles/, keyed by the sources that shape it).

    Shared by every test that needs a model: never modify it (copy it with devtools.tiny_bundle.copy_bundle).
    """
    import torch

    from devtools.bundle_cache import CACHE_ROOT, cached_tiny_bundle

    torch.set_num_threads(1)
    return cached_tiny_bundle(CACHE_ROOT)


@pytest.fixture(params=[True, False], ids=["fast-path", "pynetdicom-as-released"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    """Setting `pynetdicom_fast_path`: listener tests run with grok_pacs.dicom.fastpath and without it."""
    return request.param


def _session_server(start, tmp_path_factory: pytest.TempPathFactory, name: str):
    """Start a real server in its own temp folder (a missing tool fails the test), yield it, stop it."""
    try:
        server = start(tmp_path_factory.mktemp(name))
    except devtools.tools.MissingToolError as exc:
        pytest.fail(str(exc))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory):
    """A real S3-compatible server (devtools.seaweedfs.SeaweedFS) for the session; a missing `weed` fails."""
    from devtools.seaweedfs import SeaweedFS

    yield from _session_server(SeaweedFS, tmp_path_factory, "seaweedfs")


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory):
    """One real PostgreSQL 15 server for the session (devtools/postgres.py), stopped after; missing -> FAIL."""
    from devtools.postgres import Postgres

    yield from _session_server(Postgres, tmp_path_factory, "postgres")


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """What StudyIndex/Outbox open, once per dialect: the embedded SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "index.sqlite"
    return request.getfixturevalue("postgres").new_database()
