"""The deployment files are valid for the tools that consume them and agree with grok-pacs itself.

Compose is validated against the compose-spec schema (check-jsonschema), the Kubernetes manifests against
the Kubernetes OpenAPI schemas (kubernetes-validate, offline), the systemd units by systemd-analyze, and
the Orthanc auto-routing script runs in a real Orthanc. No docker engine is needed: compose is validated,
not run.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import require_tool
from ophthalmic_dicom import Patient, make_cfp, make_oct, write

from devtools.ports import free_port
from grok_pacs.config import Settings, load_settings
from grok_pacs.secret_files import SECRET_FIELDS, file_variable

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
COMPOSE_MANY = DEPLOY / "compose" / "compose.many-hosts.yaml"  # PostgreSQL, S3, Redis; no shared volume
K8S_FILES = sorted((DEPLOY / "k8s").glob("*.yaml"))
UNITS = [DEPLOY / "systemd" / "grok-pacs-listener.service", DEPLOY / "systemd" / "grok-pacs-worker@.service"]
VENV_BIN = Path(sys.executable).parent
METRICS_PORT = 9110  # the port every example uses for /metrics and /health


def _tool(name: str) -> str:
    """A console script of this environment (check-jsonschema, kubernetes-validate), else from PATH."""
    local = VENV_BIN / name
    return str(local) if local.exists() else require_tool(name)


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _k8s_docs() -> list[dict]:
    docs = []
    for path in K8S_FILES:
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


# --- compose ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_MANY], ids=lambda p: p.name)
def test_compose_file_is_valid_compose_spec(path: Path) -> None:
    result = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_rejects_a_broken_file(tmp_path: Path) -> None:
    """The validator is really checking: a misspelt key and a malformed GPU reservation fail."""
    broken = COMPOSE.read_text().replace("      retries: 5", "      retrys: 5")
    broken = broken.replace('device_ids: ["0"]', "device_ids: 0")
    path = tmp_path / "compose.yaml"
    path.write_text(broken)
    result = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path))
    assert result.returncode != 0
    assert "retrys" in result.stdout and "device_ids" in result.stdout


def test_compose_has_listener_gpu_workers_redis_orthanc_flower() -> None:
    services = _compose()["services"]
    assert {"listener", "worker-gpu0", "worker-gpu1", "redis", "orthanc", "flower"} <= set(services)
    assert services["listener"]["command"][0] == "listen"
    for name in ("worker-gpu0", "worker-gpu1"):
        worker = services[name]
        assert worker["command"][0] == "worker"
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "device_ids": [name[-1]], "capabilities": ["gpu"]}]
        assert "grok-data:/var/lib/grok-pacs" in worker["volumes"]
    assert "grok-data:/var/lib/grok-pacs" in services["listener"]["volumes"]
    # Config by file and by environment: the TOML file is mounted where GROK_PACS_CONFIG points.
    env = services["listener"]["environment"]
    assert any(v.endswith(":" + env["GROK_PACS_CONFIG"] + ":ro") for v in services["listener"]["volumes"])


def test_compose_builds_targets_that_the_dockerfile_defines() -> None:
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M))
    for name, service in _compose()["services"].items():
        if "build" in service:
            build = service["build"]
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
            assert build["target"] in stages, f"{name}: target {build['target']} not in Dockerfile stages {stages}"


def test_dockerfile_copies_files_that_exist_and_runs_as_the_k8s_user() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        *sources, _dest = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
            assert source.split("/")[0] not in ("training", "export", "devtools", "tests", "bench", "."), (
                f"the runtime image copies {source}: it holds grok_pacs only"
            )
    uid = int(re.search(r"useradd .*--uid (\d+)", text)[1])
    for doc in _k8s_docs():
        if doc["kind"] in ("Deployment", "StatefulSet", "Job") and "grok-pacs:" in json.dumps(doc):
            assert doc["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid


# --- Kubernetes ------------------------------------------------------------------------------------


def test_k8s_manifests_are_valid_kubernetes_resources() -> None:
    result = _run(_tool("kubernetes-validate"), "--strict", *map(str, K8S_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    passed = (result.stdout + result.stderr).count(" passed for resource ")
    assert passed == len(_k8s_docs())


def test_k8s_validation_rejects_a_misspelt_probe(tmp_path: Path) -> None:
    path = tmp_path / "workers.yaml"
    path.write_text((DEPLOY / "k8s" / "workers.yaml").read_text().replace("readinessProbe", "readinesProbe"))
    result = _run(_tool("kubernetes-validate"), "--strict", str(path))
    assert result.returncode != 0
    assert "readinesProbe" in result.stdout + result.stderr


def _k8s_by_kind() -> dict[str, dict[str, dict]]:
    by_kind: dict[str, dict[str, dict]] = {}
    for doc in _k8s_docs():
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    return by_kind


def test_k8s_has_listener_service_workers_redis_storage_and_settings() -> None:
    by_kind = _k8s_by_kind()
    assert "grok-pacs-redis" in by_kind["Deployment"]
    assert {"grok-pacs-listener", "grok-pacs-postgres", "grok-pacs-seaweedfs"} <= set(by_kind["StatefulSet"])
    assert set(by_kind["PersistentVolumeClaim"]) >= {"grok-pacs-bundles", "grok-pacs-redis"}
    assert "config.toml" in by_kind["ConfigMap"]["grok-pacs-config"]["data"]
    secret = by_kind["Secret"]["grok-pacs-env"]["stringData"]
    assert {"GROK_PACS_BROKER_URL", "GROK_PACS_DATABASE_URL", "GROK_PACS_STORAGE_SECRET_KEY"} <= set(secret)

    statefulset = by_kind["StatefulSet"]["grok-pacs-listener"]["spec"]
    listener = statefulset["template"]["spec"]
    volumes = {v["name"]: v for v in listener["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "grok-pacs-tls"
    claims = {c["metadata"]["name"]: c["spec"] for c in statefulset["volumeClaimTemplates"]}
    assert claims["data"]["accessModes"] == ["ReadWriteOnce"], "each listener has its own data volume"
    service = by_kind["Service"]["grok-pacs-listener"]["spec"]
    dicom_port = next(p for p in listener["containers"][0]["ports"] if p["name"] == "dicom")
    assert service["ports"][0]["targetPort"] == "dicom" and dicom_port["containerPort"] == 11112

    workers = [d for name, d in by_kind["Deployment"].items() if name.startswith("grok-pacs-worker-")]
    assert len(workers) >= 2, "one worker Deployment per GPU type"
    consumed: dict[str, int] = {}
    for worker in workers:
        gpu_type = worker["metadata"]["labels"]["grok-pacs/gpu-type"]
        pod = worker["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"]["nvidia.com/gpu.product"], f"{gpu_type} workers must land on {gpu_type} nodes"
        args = container["args"]
        queue = args[args.index("--queue") + 1]
        assert queue == f"grok-{gpu_type}", "each GPU type consumes its own queue"
        consumed[queue] = worker["spec"]["replicas"]
    listener_queue = tomllib.loads(by_kind["ConfigMap"]["grok-pacs-config"]["data"]["config.toml"])["queue"]
    assert consumed.get(listener_queue, 0) >= 1, f"no running worker consumes the listener's queue {listener_queue}"


def test_compose_listener_and_workers_share_queue_broker_and_data() -> None:
    services = _compose()["services"]
    env = {name: services[name]["environment"] for name in ("listener", "worker-gpu0", "worker-gpu1")}
    for key in ("GROK_PACS_QUEUE", "GROK_PACS_BROKER_URL", "GROK_PACS_DATA_DIR", "GROK_PACS_CONFIG"):
        assert len({e[key] for e in env.values()}) == 1, f"listener and workers disagree on {key}"


def test_probes_and_healthchecks_use_paths_the_metrics_server_serves(tmp_path: Path) -> None:
    """Every probe path in the manifests and compose exists on the real server (not a 404)."""
    import urllib.error
    import urllib.request

    from grok_pacs.ops import health, observability

    paths = set()
    for doc in _k8s_docs():
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                get = container.get(probe, {}).get("httpGet")
                if get:
                    assert get["port"] == "metrics"
                    assert {"name": "metrics", "containerPort": METRICS_PORT} in container["ports"]
                    paths.add(get["path"])
    for service in _compose()["services"].values():
        for arg in service.get("healthcheck", {}).get("test", []):
            paths.update(re.findall(rf"http://127\.0\.0\.1:{METRICS_PORT}(/[\w/]+)", arg))
    assert {"/health", "/health/live"} <= paths

    settings = load_settings(data_dir=tmp_path, metrics_port=free_port(), bind_address="127.0.0.1")
    checker = health.HealthChecker({"always": lambda: health.CheckResult(True, "fine")})
    server = observability.start_server(settings, "listener", checker=checker)
    try:
        for path in sorted(paths):
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=10) as reply:
                assert reply.status == 200 and json.load(reply)["status"] == "ok", path
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10)
        assert missing.value.code == 404
    finally:
        server.close()


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

    configmap = next(d for d in _k8s_docs() if d["kind"] == "ConfigMap")
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


# --- systemd -------------------------------------------------------------------------------------------


def _systemd_root(tmp_path: Path) -> Path:
    """An alternate root with the system units, the grok-pacs units and an executable at ExecStart."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(unit, unit_dir / unit.name)
        exec_start = re.search(r"^ExecStart=(\S+)", unit.read_text(), re.M)[1]
        target = root / exec_start.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(VENV_BIN / "grok-pacs", target)  # the real entry point, where the units expect it
    return root


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = require_tool("systemd-analyze")
    root = _systemd_root(tmp_path)
    units = [f"/etc/systemd/system/{unit.name}" for unit in UNITS]
    result = subprocess.run(
        [tool, "verify", "--man=no", f"--root={root}", *units], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on unknown keys and unparsable values but prints them: any output is a failure.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_systemd_verify_reports_a_misspelt_directive(tmp_path: Path) -> None:
    tool = require_tool("systemd-analyze")
    root = _systemd_root(tmp_path)
    unit = root / "etc/systemd/system/grok-pacs-listener.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    result = subprocess.run(
        [tool, "verify", "--man=no", f"--root={root}", "/etc/systemd/system/" + unit.name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "ProtectSytem" in result.stderr


def test_systemd_units_are_hardened(tmp_path: Path) -> None:
    tool = require_tool("systemd-analyze")
    root = _systemd_root(tmp_path)
    for unit in UNITS:
        text = unit.read_text()
        for directive in (
            "User=grok-pacs",
            "ProtectSystem=strict",
            "ReadWritePaths=/var/lib/grok-pacs",
            "Restart=on-failure",
            "NoNewPrivileges=yes",
            "ProtectHome=yes",
        ):
            assert re.search(rf"^{re.escape(directive)}$", text, re.M), f"{unit.name}: no {directive}"
        result = subprocess.run(
            [tool, "security", "--offline=yes", f"--root={root}", f"/etc/systemd/system/{unit.name}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        level = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout + result.stderr)
        assert level, result.stdout + result.stderr
        assert float(level[1]) <= 3.0, f"{unit.name}: exposure {level[1]} (0 safe .. 10 unsafe)"


# --- Orthanc auto-routing --------------------------------------------------------------------------------


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode} before opening port {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"{what} did not open port {port} within {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def test_orthanc_lua_autoroute_forwards_op_and_opt_only(tmp_path: Path) -> None:
    """The shipped orthanc.json + autoroute.lua in a real Orthanc, routing to a grok-pacs listener that
    runs the shipped compose config.toml (its AE title and allow-list): OP and OPT arrive, OT does not."""
    from grok_pacs.ingest.service import IngestService
    from grok_pacs.jobs.publisher import JobPublisher

    orthanc, storescu = require_tool("Orthanc"), require_tool("storescu")
    config = json.loads((DEPLOY / "compose/orthanc/orthanc.json").read_text())
    dicom_port, grok_port = free_port(), free_port()
    grok_ae, grok_host, grok_default_port = config["DicomModalities"]["grok"]
    shipped = load_settings(DEPLOY / "compose/config.toml")
    assert (grok_ae, grok_default_port) == (shipped.ae_title, shipped.port), "orthanc.json must call the listener"
    assert config["DicomAet"] in shipped.allowed_aes, "the listener must allow Orthanc's AE title"
    settings = load_settings(
        DEPLOY / "compose/config.toml",
        data_dir=tmp_path / "grok",
        port=grok_port,
        bind_address="127.0.0.1",
        broker_url="",
        metrics_port=0,
    )
    config.update(
        DicomPort=dicom_port,
        HttpServerEnabled=False,
        StorageDirectory=str(tmp_path / "db"),
        IndexDirectory=str(tmp_path / "db"),
        LuaScripts=[str(DEPLOY / "compose/orthanc/autoroute.lua")],
        DicomModalities={"grok": [grok_ae, "127.0.0.1", grok_port]},
    )
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/orthanc.json").write_text(json.dumps(config))

    patient = Patient()
    other = make_cfp(patient, "L")
    other.Modality = "OT"  # not an ophthalmic modality: must stay in Orthanc
    files = [
        write(other, tmp_path / "in/ot.dcm"),
        write(make_cfp(patient, "R"), tmp_path / "in/cfp.dcm"),
        write(make_oct(patient, "R"), tmp_path / "in/oct.dcm"),
    ]
    service = IngestService(settings, JobPublisher(settings))
    service.start()
    log_path = tmp_path / "orthanc.log"
    with log_path.open("w") as log:
        server = subprocess.Popen([orthanc, f"{tmp_path / 'etc'}/"], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_port(dicom_port, server, "Orthanc")
        sent = subprocess.run(
            [storescu, "-aet", "MODALITY", "-aec", config["DicomAet"], "127.0.0.1", str(dicom_port), *map(str, files)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
        deadline = time.monotonic() + 30
        while len(service.index.instances(patient.study_uid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        received = sorted(i.modality for i in service.index.instances(patient.study_uid))
        callers = {i.calling_ae for i in service.index.instances(patient.study_uid)}
    finally:
        _stop(server)
        service.stop()
    assert received == ["OP", "OPT"], f"grok-pacs received {received}; Orthanc log:\n{log_path.read_text()[-3000:]}"
    assert callers == {config["DicomAet"]}
    assert grok_host == "listener"  # the compose service name of the grok-pacs listener


def test_deploy_guide_quotes_the_shipped_lua_script() -> None:
    guide = (ROOT / "docs/deploy.md").read_text()
    block = re.search(r"```lua\n(.*?)```", guide, re.S)[1]
    assert block == (DEPLOY / "compose/orthanc/autoroute.lua").read_text()


# --- the commands every deployment runs exist ------------------------------------------------------------


def _deployed_commands() -> dict[str, set[str]]:
    """grok-pacs subcommand -> the options the deployment files pass to it."""
    invocations: list[list[str]] = []
    for service in [*_compose()["services"].values(), *_compose(COMPOSE_MANY)["services"].values()]:
        if str(service.get("image", "")).startswith("grok-pacs:"):
            invocations.append(service["command"])
    for doc in _k8s_docs():
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
        result = _run(sys.executable, "-m", "grok_pacs.cli", command, "--help")
        assert result.returncode == 0, f"grok-pacs {command} --help failed: {result.stderr[-2000:]}"
        for option in options:
            assert re.search(rf"(^|\s){re.escape(option)}\b", result.stdout), f"grok-pacs {command} has no {option}"


# --- many hosts: PostgreSQL, object store, Redis; no volume shared between listener and workers -----------

GROK_PACS_PROCESSES = ("listener", "worker-gpu0", "worker-gpu1", "db-upgrade")


def _volume_names(service: dict) -> set[str]:
    return {v.split(":")[0] for v in service.get("volumes", []) if not v.startswith((".", "$", "/"))}


def test_many_hosts_compose_shares_no_volume_and_upgrades_the_schema_first() -> None:
    services = _compose(COMPOSE_MANY)["services"]
    assert {"postgres", "seaweedfs", "bucket", "redis", *GROK_PACS_PROCESSES} <= set(services)
    owners: dict[str, list[str]] = {}
    for name, service in services.items():
        for volume in _volume_names(service):
            owners.setdefault(volume, []).append(name)
    assert {volume: names for volume, names in owners.items() if len(names) > 1} == {}, "a shared volume"
    assert _volume_names(services["listener"]) == {"listener-data"}
    assert _volume_names(services["worker-gpu0"]) == {"worker-gpu0-scratch"}
    assert _volume_names(services["db-upgrade"]) == set()

    assert services["db-upgrade"]["command"] == ["db", "upgrade"]
    waits = services["listener"]["depends_on"]
    assert waits["db-upgrade"]["condition"] == waits["bucket"]["condition"] == "service_completed_successfully"
    env = {name: services[name]["environment"] for name in GROK_PACS_PROCESSES}
    for key in ("GROK_PACS_DATABASE_URL", "GROK_PACS_BROKER_URL", "GROK_PACS_STORAGE_ENDPOINT", "GROK_PACS_QUEUE"):
        assert len({e[key] for e in env.values()}) == 1, f"listener, workers and db-upgrade disagree on {key}"
    assert "GROK_PACS_NODE_ID" in env["listener"]

    example = dict(
        line.split("=", 1) for line in COMPOSE_MANY.with_name("many-hosts.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )  # fmt: skip
    url = example["GROK_PACS_DATABASE_URL"]
    assert url.startswith("postgresql+psycopg://") and f":{example['POSTGRES_PASSWORD']}@" in url
    identities = _compose(COMPOSE_MANY)["configs"]["s3-identities"]["content"]
    assert "${GROK_PACS_STORAGE_ACCESS_KEY}" in identities and "${GROK_PACS_STORAGE_SECRET_KEY}" in identities


def _pod_specs(by_kind: dict[str, dict[str, dict]]) -> dict[str, dict]:
    return {
        name: doc["spec"]["template"]["spec"]
        for kind in ("Deployment", "StatefulSet", "Job")
        for name, doc in by_kind.get(kind, {}).items()
    }


def test_k8s_many_hosts_layout_shares_no_writable_volume_and_has_a_schema_job() -> None:
    by_kind = _k8s_by_kind()
    shared_claims = {
        name
        for name, claim in by_kind["PersistentVolumeClaim"].items()
        if "ReadWriteMany" in claim["spec"]["accessModes"]
    }
    for name, pod in _pod_specs(by_kind).items():
        mounts = {m["name"]: m for c in pod["containers"] for m in c.get("volumeMounts", [])}
        for volume in pod.get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim in shared_claims:
                assert mounts[volume["name"]].get("readOnly") and volume["persistentVolumeClaim"].get("readOnly"), (
                    f"{name} mounts the shared claim {claim} writable"
                )
    for name, pod in _pod_specs(by_kind).items():
        if name.startswith("grok-pacs-worker-"):
            data = next(v for v in pod["volumes"] if v["name"] == "data")
            assert "emptyDir" in data, f"{name}: a worker's data directory is scratch only"

    listener = by_kind["StatefulSet"]["grok-pacs-listener"]["spec"]["template"]["spec"]["containers"][0]
    node_id = next(e for e in listener["env"] if e["name"] == "GROK_PACS_NODE_ID")
    assert node_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", "a stable name per listener volume"
    job = by_kind["Job"]["grok-pacs-db-upgrade"]["spec"]["template"]["spec"]["containers"][0]
    assert job["args"] == ["db", "upgrade"]

    secret = by_kind["Secret"]["grok-pacs-env"]["stringData"]
    database = secret["GROK_PACS_DATABASE_URL"]
    assert database.startswith("postgresql+psycopg://")
    assert f":{by_kind['Secret']['grok-pacs-postgres']['stringData']['POSTGRES_PASSWORD']}@" in database
    identity = json.loads(by_kind["Secret"]["grok-pacs-seaweedfs"]["stringData"]["s3.json"])["identities"][0]
    key = identity["credentials"][0]
    assert (key["accessKey"], key["secretKey"]) == (
        secret["GROK_PACS_STORAGE_ACCESS_KEY"],
        secret["GROK_PACS_STORAGE_SECRET_KEY"],
    ), "the store's key is the one grok-pacs uses"
    assert "s3.bucket.create -name grok-pacs" in json.dumps(by_kind["Job"]["grok-pacs-bucket"])


def test_k8s_config_and_secret_together_are_valid_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a listener pod starts with: config.toml from the ConfigMap, the Secret's variables over it."""
    by_kind = _k8s_by_kind()
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
