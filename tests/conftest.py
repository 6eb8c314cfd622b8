"""Shared test fixtures. Tools a test needs must be present: a missing tool fails the test, never skips."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from devtools.ports import free_port

# Two cores are shared by everything the suite starts: keep torch/BLAS from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def require_tool(name: str) -> str:
    """Path of an executable the test needs; fails (never skips) when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"required tool {name!r} is not installed (run scripts/install-system-deps.sh)")
    return path


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def tiny_bundle() -> Path:
    """A complete tiny model bundle built through `export.build_bundle` (tests/bundle_cache.py caches it
    under .cache/grok-bundles/, keyed by the sources that shape it).

    Shared by every test that needs a model: never modify it (copy it with helpers.tiny_bundle.copy_bundle).
    """
    import torch

    from bundle_cache import CACHE_ROOT, cached_tiny_bundle

    torch.set_num_threads(1)
    return cached_tiny_bundle(CACHE_ROOT)
