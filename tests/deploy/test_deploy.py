"""The deployment files are valid for the tools that consume them: compose against the compose-spec schema
(check-jsonschema), the Kubernetes manifests against the Kubernetes OpenAPI schemas (kubernetes-validate, offline),
and both layouts (one box, many hosts) hold what each process needs. No docker engine is needed: compose is
validated, not run.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from devtools.ports import free_port
from grok_pacs.config import load_settings
from tests.helpers.deploy_files import (
    COMPOSE,
    COMPOSE_MANY,
    DEPLOY,
    K8S_FILES,
    METRICS_PORT,
    ROOT,
    k8s_by_kind,
    k8s_docs,
    load_compose,
    run_at_root,
    venv_tool,
)

# --- compose ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_MANY], ids=lambda p: p.name)
def test_compose_file_is_valid_compose_spec(path: Path) -> None:
    result = run_at_root(venv_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_rejects_a_broken_file(tmp_path: Path) -> None:
    """The validator is really checking: a misspelt key and a malformed GPU reservation fail."""
    broken = COMPOSE.read_text().replace("      retries: 5", "      retrys: 5")
    broken = broken.replace('device_ids: ["0"]', "device_ids: 0")
    path = tmp_path / "compose.yaml"
    path.write_text(broken)
    result = run_at_root(venv_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path))
    assert result.returncode != 0
    assert "retrys" in result.stdout and "device_ids" in result.stdout


def test_compose_has_listener_gpu_workers_redis_orthanc_flower() -> None:
    services = load_compose()["services"]
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


def test_compose_review_page_is_opt_in_and_reaches_this_host_only() -> None:
    review = load_compose()["services"]["review"]
    assert review["command"] == ["review"] and review["profiles"] == ["review"]
    assert review["ports"] == ["127.0.0.1:8080:8080"]  # behind the hospital's TLS proxy, never on every interface
    env = review["environment"]
    assert env["GROK_PACS_REVIEW_PORT"] == "8080" and "GROK_PACS_REVIEW_SECRET_KEY" in env
    assert "grok-data:/var/lib/grok-pacs" in review["volumes"]  # the register, the index and the images


def test_compose_builds_targets_that_the_dockerfile_defines() -> None:
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M))
    for name, service in load_compose()["services"].items():
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
    for doc in k8s_docs():
        if doc["kind"] in ("Deployment", "StatefulSet", "Job") and "grok-pacs:" in json.dumps(doc):
            assert doc["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid


# --- Kubernetes ------------------------------------------------------------------------------------


def test_k8s_manifests_are_valid_kubernetes_resources() -> None:
    result = run_at_root(venv_tool("kubernetes-validate"), "--strict", *map(str, K8S_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    passed = (result.stdout + result.stderr).count(" passed for resource ")
    assert passed == len(k8s_docs())


def test_k8s_validation_rejects_a_misspelt_probe(tmp_path: Path) -> None:
    path = tmp_path / "workers.yaml"
    path.write_text((DEPLOY / "k8s" / "workers.yaml").read_text().replace("readinessProbe", "readinesProbe"))
    result = run_at_root(venv_tool("kubernetes-validate"), "--strict", str(path))
    assert result.returncode != 0
    assert "readinesProbe" in result.stdout + result.stderr


def test_k8s_has_listener_service_workers_redis_storage_and_settings() -> None:
    by_kind = k8s_by_kind()
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
    services = load_compose()["services"]
    env = {name: services[name]["environment"] for name in ("listener", "worker-gpu0", "worker-gpu1")}
    for key in ("GROK_PACS_QUEUE", "GROK_PACS_BROKER_URL", "GROK_PACS_DATA_DIR", "GROK_PACS_CONFIG"):
        assert len({e[key] for e in env.values()}) == 1, f"listener and workers disagree on {key}"


def test_probes_and_healthchecks_use_paths_the_metrics_server_serves(tmp_path: Path) -> None:
    """Every probe path in the manifests and compose exists on the real server (not a 404)."""
    import urllib.error
    import urllib.request

    from grok_pacs.ops import health, observability

    paths = set()
    for doc in k8s_docs():
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                get = container.get(probe, {}).get("httpGet")
                if get:
                    assert get["port"] == "metrics"
                    assert {"name": "metrics", "containerPort": METRICS_PORT} in container["ports"]
                    paths.add(get["path"])
    for service in load_compose()["services"].values():
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


# --- many hosts: PostgreSQL, object store, Redis; no volume shared between listener and workers -----------

GROK_PACS_PROCESSES = ("listener", "worker-gpu0", "worker-gpu1", "db-upgrade")


def _volume_names(service: dict) -> set[str]:
    return {v.split(":")[0] for v in service.get("volumes", []) if not v.startswith((".", "$", "/"))}


def test_many_hosts_compose_shares_no_volume_and_upgrades_the_schema_first() -> None:
    services = load_compose(COMPOSE_MANY)["services"]
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
    identities = load_compose(COMPOSE_MANY)["configs"]["s3-identities"]["content"]
    assert "${GROK_PACS_STORAGE_ACCESS_KEY}" in identities and "${GROK_PACS_STORAGE_SECRET_KEY}" in identities


def _pod_specs(by_kind: dict[str, dict[str, dict]]) -> dict[str, dict]:
    return {
        name: doc["spec"]["template"]["spec"]
        for kind in ("Deployment", "StatefulSet", "Job")
        for name, doc in by_kind.get(kind, {}).items()
    }


def test_k8s_many_hosts_layout_shares_no_writable_volume_and_has_a_schema_job() -> None:
    by_kind = k8s_by_kind()
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


# --- monitoring: Prometheus rules and the Grafana dashboard -------------------------------------------
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "grok-pacs-drift.json"


def _drift_families() -> dict[str, set[str]]:
    """Each family the drift collector exports, with its series names (a histogram's _bucket, _sum, _count)."""
    from grok_pacs.ops import drift

    histogram = ("_bucket", "_sum", "_count")
    return {
        f.name: {f.name + s for s in histogram} if f.type == "histogram" else {f.name}
        for f in drift.families({}, 3600.0, 0.0)
    }


def _drift_names() -> set[str]:
    return set().union(*_drift_families().values())


def test_prometheus_rules_load_and_fire_as_their_unit_tests_expect() -> None:
    """promtool (Prometheus' own parser) loads every rule, and the drift rules fire on drift and only then."""
    promtool = venv_tool("promtool")
    checked = run_at_root(promtool, "check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run_at_root(promtool, "test", "rules", str(PROMETHEUS / "alerts.test.yml"))
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    rules = (PROMETHEUS / "alerts.yml").read_text()
    used = set(re.findall(r"grok_pacs_drift_[a-z_]+", rules))
    assert used and used <= _drift_names(), f"rules read series nobody exports: {used - _drift_names()}"


def test_drift_dashboard_shows_every_drift_figure_per_bundle_version() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "label_values(grok_pacs_drift_results, bundle_version)" in variables["bundle_version"]["definition"]
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    rows = [p for p in panels if p["type"] == "row"]
    assert [r.get("repeat") for r in rows] == ["bundle_version"], "one row of panels per bundle version"
    exprs = []
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, f"panel {panel['title']!r} is off the grid"
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"], panel["title"]
            exprs.append(target["expr"])
            if "grok_pacs_drift_updated" not in target["expr"]:
                assert 'bundle_version="$bundle_version"' in target["expr"], f"{panel['title']!r} not per bundle"
    used = set(re.findall(r"grok_pacs_drift_[a-z_]+", " ".join(exprs)))
    assert used <= _drift_names(), f"the dashboard reads series nobody exports: {used - _drift_names()}"
    unshown = {family for family, names in _drift_families().items() if not names & used}
    assert unshown <= {"grok_pacs_drift_window_seconds"}, f"figures without a panel: {unshown}"
