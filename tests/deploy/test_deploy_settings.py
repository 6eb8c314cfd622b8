"""The deployment files agree with grok-pacs itself: every GROK_PACS_* variable is a setting, the example
configs load, and every command and option they run exists in the CLI."""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

import pytest

from grok_pacs.config import Settings, load_settings
from grok_pacs.secret_files import SECRET_FIELDS, file_variable
from tests.helpers.deploy_files import (
    COMPOSE,
    COMPOSE_MANY,
    DEPLOY,
    K8S_FILES,
    METRICS_PORT,
    ROOT,
    UNITS,
    k8s_by_kind,
    k8s_docs,
    load_compose,
    run_at_root,
)

# --- settings used by every deployment ---------------------------------------------------------------


def _env_names() -> dict[str, set[str]]:
    """GROK_PACS_* names each deployment sets, by file."""
    found: dict[str, set[str]] = {}
    many_hosts = [COMPOSE_MANY, COMPOSE_MANY.with_name("many-hosts.env.example")]
    for path in [COMPOSE, *many_hosts, *K8S_FILES, *UNITS, DEPLOY / "Dockerfile", ROOT / "docs/deploy.md"]:
        found[path.name] = set(re.findall(r"\b(GROK_PACS_[A-Z_]+)\b", path.read_text()))
    return found


def test_every_grok_pacs_variable_names_a_setting() -> None:
    known = {f"GROK_PACS_{name.upper()}" for name in Settings.model_fields} | {"GROK_PACS_CONFIG"}
    known |= {"GROK_PACS_BUNDLES_DIR"}  # compose-only: the host directory mounted as the bundles volume
    known |= {file_variable(name) for name in SECRET_FIELDS}  # secrets read from files
    found = _env_names()
    files = ("compose.yaml", "compose.many-hosts.yaml", "many-hosts.env.example", "listener.yaml", "workers.yaml")
    for file in (*files, "db-upgrade.yaml", "grok-pacs-listener.service", "deploy.md"):
        assert found[file], f"{file} sets no GROK_PACS_* variable"
    for file, names in found.items():
        assert names <= known, f"{file}: {sorted(names - known)} are not grok-pacs settings"


def test_example_configs_load_and_enable_metrics() -> None:
    compose_settings = load_settings(DEPLOY / "compose" / "config.toml")
    assert compose_settings.metrics_port == METRICS_PORT
    assert str(compose_settings.destination) == "ORTHANC@orthanc:4242"
    assert compose_settings.allowed_aes == ["ORTHANC"]

    configmap = next(d for d in k8s_docs() if d["kind"] == "ConfigMap")
    values = tomllib.loads(configmap["data"]["config.toml"])
    k8s_settings = Settings(**values)
    assert k8s_settings.metrics_port == METRICS_PORT
    assert k8s_settings.metrics_bind_address == "0.0.0.0", "probes and Prometheus reach the pod IP"
    assert k8s_settings.data_dir == Path("/var/lib/grok-pacs")
    assert str(k8s_settings.storage_url) == "s3://grok-pacs", "k8s workers read instances from the store only"

    many = load_settings(DEPLOY / "compose" / "config.many-hosts.toml")
    assert (str(many.storage_url), many.metrics_port) == ("s3://grok-pacs", METRICS_PORT)


def test_environment_overrides_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What compose and k8s rely on: GROK_PACS_CONFIG names the file, variables win over it."""
    monkeypatch.setenv("GROK_PACS_CONFIG", str(DEPLOY / "compose" / "config.toml"))
    monkeypatch.setenv("GROK_PACS_ALLOWED_AES", "PACS1,PACS2")
    monkeypatch.setenv("GROK_PACS_DESTINATION", "PACS@pacs.example:104")
    settings = load_settings()
    assert settings.allowed_aes == ["PACS1", "PACS2"]
    assert str(settings.destination) == "PACS@pacs.example:104"
    assert settings.queue == "grok"  # from the file


# --- the commands every deployment runs exist ------------------------------------------------------------


def _deployed_commands() -> dict[str, set[str]]:
    """grok-pacs subcommand -> the options the deployment files pass to it."""
    invocations: list[list[str]] = []
    for service in [*load_compose()["services"].values(), *load_compose(COMPOSE_MANY)["services"].values()]:
        if str(service.get("image", "")).startswith("grok-pacs:"):
            invocations.append(service["command"])
    for doc in k8s_docs():
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            if container["image"].startswith("grok-pacs:"):
                invocations.append(container["args"])
    for unit in UNITS:
        invocations.append(re.search(r"^ExecStart=\S+ (.+)$", unit.read_text(), re.M)[1].split())
    for cmd in re.findall(r"^CMD (\[.+\])$", (DEPLOY / "Dockerfile").read_text(), re.M):
        invocations.append(json.loads(cmd))
    commands: dict[str, set[str]] = {}
    for args in invocations:
        commands.setdefault(args[0], set()).update(a.split("=", 1)[0] for a in args[1:] if a.startswith("--"))
    return commands


def test_deployed_commands_and_options_exist_in_the_cli() -> None:
    commands = _deployed_commands()
    assert {"listen", "worker", "serve", "db"} <= set(commands)
    for command, options in sorted(commands.items()):
        result = run_at_root(sys.executable, "-m", "grok_pacs.cli", command, "--help")
        assert result.returncode == 0, f"grok-pacs {command} --help failed: {result.stderr[-2000:]}"
        for option in options:
            assert re.search(rf"(^|\s){re.escape(option)}\b", result.stdout), f"grok-pacs {command} has no {option}"


# --- many hosts: the settings each process starts with ----------------------------------------------------


def test_k8s_config_and_secret_together_are_valid_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a listener pod starts with: config.toml from the ConfigMap, the Secret's variables over it."""
    by_kind = k8s_by_kind()
    config = tmp_path / "config.toml"
    config.write_text(by_kind["ConfigMap"]["grok-pacs-config"]["data"]["config.toml"])
    for name, value in by_kind["Secret"]["grok-pacs-env"]["stringData"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GROK_PACS_NODE_ID", "grok-pacs-listener-0")  # the pod name, by the downward API
    settings = load_settings(config)
    assert settings.resolved_database_url.endswith("@grok-pacs-postgres:5432/grok")
    assert (str(settings.storage_url), settings.storage_endpoint) == (
        "s3://grok-pacs",
        "http://grok-pacs-seaweedfs:8333",
    )
    assert settings.storage_access_key and settings.node_id == "grok-pacs-listener-0"


def test_many_hosts_compose_config_and_env_example_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    example = COMPOSE_MANY.with_name("many-hosts.env.example").read_text().splitlines()
    for name, value in (line.split("=", 1) for line in example if line.startswith("GROK_PACS_")):
        monkeypatch.setenv(name, value)
    settings = load_settings(COMPOSE_MANY.with_name("config.many-hosts.toml"))
    assert settings.resolved_database_url.startswith("postgresql+psycopg://") and settings.storage_access_key
    assert str(settings.destination) == "PACS@pacs.hospital.example:104"
