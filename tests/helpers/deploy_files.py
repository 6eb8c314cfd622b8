"""The deployment files (deploy/: compose, Kubernetes, systemd, Dockerfile) as the deploy tests read them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
COMPOSE_MANY = DEPLOY / "compose" / "compose.many-hosts.yaml"  # PostgreSQL, S3, Redis; no shared volume
K8S_FILES = sorted((DEPLOY / "k8s").glob("*.yaml"))
UNITS = [DEPLOY / "systemd" / "grok-pacs-listener.service", DEPLOY / "systemd" / "grok-pacs-worker@.service"]
VENV_BIN = Path(sys.executable).parent
METRICS_PORT = 9110  # the port every example uses for /metrics and /health


def venv_tool(name: str) -> str:
    """A console script of this environment (check-jsonschema, kubernetes-validate), else from PATH."""
    local = VENV_BIN / name
    return str(local) if local.exists() else require_tool(name)


def run_at_root(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def k8s_docs() -> list[dict]:
    docs = []
    for path in K8S_FILES:
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def load_compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def k8s_by_kind() -> dict[str, dict[str, dict]]:
    by_kind: dict[str, dict[str, dict]] = {}
    for doc in k8s_docs():
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    return by_kind
