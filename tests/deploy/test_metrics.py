"""The Prometheus endpoint and /health, scraped over loopback from real processes.

The main test runs `grok-pacs listen` with metrics_port set, sends instances with DCMTK's storescu and
checks the counters against what the listener actually wrote to its data directory.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.ports import free_port
from devtools.processes import Redis
from grok_pacs.config import load_settings
from grok_pacs.dicom.sop_classes import OP_8BIT, OPT
from grok_pacs.ingest.service import IngestService
from grok_pacs.jobs.publisher import JobPublisher
from grok_pacs.ops import health, metrics, observability
from tests.helpers.metrics_scrape import get, running, scrape, storescu, value, wait_for
from tests.helpers.ophthalmic_dicom import Patient, make_cfp, make_oct, write

# --- a real ingest through `grok-pacs listen` ---------------------------------------------------------------


@pytest.fixture
def listen(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    """`grok-pacs listen` on free loopback ports with metrics on; yields (dicom_port, metrics_port, data)."""
    dicom_port, metrics_port, data = free_port(), free_port(), tmp_path / "data"
    env = {
        "GROK_PACS_DATA_DIR": str(data),
        "GROK_PACS_PORT": str(dicom_port),
        "GROK_PACS_BROKER_URL": "",
        "GROK_PACS_BIND_ADDRESS": "127.0.0.1",
        "GROK_PACS_ALLOWED_AES": "MODALITY",
        "GROK_PACS_QUIET_PERIOD": "1",
    }
    with running(tmp_path, "listen", env, metrics_port):
        yield dicom_port, metrics_port, data


def test_metrics_scraped_during_a_real_ingest(listen, tmp_path: Path) -> None:
    dicom_port, metrics_port, data = listen
    before = scrape(metrics_port)
    assert value(before, "grok_pacs_associations_total", outcome="accepted") == 0
    assert value(before, "grok_pacs_received_bytes_total") == 0

    patient = Patient()
    cfp = write(make_cfp(patient, "R"), tmp_path / "send/cfp.dcm")
    oct_ = write(make_oct(patient, "R"), tmp_path / "send/oct.dcm")
    sent = storescu("-aet", "MODALITY", "-aec", "GROK_PACS", "127.0.0.1", str(dicom_port), str(cfp), str(oct_))
    assert sent.returncode == 0, sent.stderr
    again = storescu("-aet", "MODALITY", "-aec", "GROK_PACS", "127.0.0.1", str(dicom_port), str(cfp))
    assert again.returncode == 0, again.stderr
    refused = storescu("-aet", "INTRUDER", "-aec", "GROK_PACS", "127.0.0.1", str(dicom_port), str(cfp))
    assert refused.returncode != 0  # not in allowed_aes: association rejected

    stored = sorted((data / "incoming").rglob("*.dcm"))
    assert len(stored) == 2
    samples = scrape(metrics_port)
    assert value(samples, "grok_pacs_associations_total", outcome="accepted") == 2
    assert value(samples, "grok_pacs_associations_total", outcome="rejected") == 1
    assert value(samples, "grok_pacs_instances_received_total", sop_class=OP_8BIT) == 1
    assert value(samples, "grok_pacs_instances_received_total", sop_class=OPT) == 1
    assert value(samples, "grok_pacs_instances_duplicate_total") == 1
    assert value(samples, "grok_pacs_received_bytes_total") == sum(p.stat().st_size for p in stored)
    free = shutil.disk_usage(data).free
    assert abs(value(samples, "grok_pacs_data_dir_free_bytes") - free) < 0.05 * free

    # Studies by state: RECEIVING until quiet for quiet_period (1 s), then QUEUED on the broker.
    wait_for(
        lambda: value(scrape(metrics_port), "grok_pacs_studies", state="QUEUED") == 1,
        "the study to be queued",
        timeout=30,
    )
    samples = scrape(metrics_port)
    assert value(samples, "grok_pacs_studies", state="RECEIVING") == 0
    assert value(samples, "grok_pacs_studies", state="FAILED") == 0

    status, body = get(f"http://127.0.0.1:{metrics_port}/health")
    report = json.loads(body)
    assert status == 200 and report["status"] == "ok"
    assert set(report["checks"]) == {"listener", "database", "broker", "disk"}
    assert str(dicom_port) in report["checks"]["listener"]["detail"]


# --- failures show in metrics and health -------------------------------------------------------------------


def test_refused_instance_is_counted_and_health_reports_the_disk(tmp_path: Path) -> None:
    """Free disk below min_free_disk_mb: C-STORE refused (A700), counted by reason, /health 503."""
    settings = load_settings(
        data_dir=tmp_path / "data",
        port=free_port(),
        bind_address="127.0.0.1",
        metrics_port=free_port(),
        min_free_disk_mb=10**9,
        transfer_reserve_mb=0,  # the per-instance watermark (a reserve would refuse the association first)
        broker_url="",
    )
    reason = {"reason": "REFUSED_OUT_OF_RESOURCES"}
    start = scrape_local(reason)
    service = IngestService(settings, JobPublisher(settings))
    server = observability.start_server(settings, "listener")
    try:
        service.start()
        cfp = write(make_cfp(Patient(), "L"), tmp_path / "send/cfp.dcm")
        sent = storescu("-aet", "MODALITY", "-aec", settings.ae_title, "127.0.0.1", str(settings.port), str(cfp))
        assert sent.returncode != 0, "storescu reported success for a refused instance"
        samples = scrape(server.port)
        assert value(samples, "grok_pacs_instances_failed_total", **reason) == start + 1
        status, body = get(f"http://127.0.0.1:{server.port}/health")
        report = json.loads(body)
        assert status == 503 and report["status"] == "fail"
        assert not report["checks"]["disk"]["ok"] and "min_free_disk_mb" in report["checks"]["disk"]["detail"]
        assert report["checks"]["listener"]["ok"] and report["checks"]["broker"]["ok"]
    finally:
        server.close()
        service.stop()
    assert not list((settings.data_dir / "incoming").rglob("*.dcm"))


def scrape_local(labels: dict[str, str]) -> float:
    """Current value of instances_failed_total{labels} in this process's registry (counters are global)."""
    sample = metrics.REGISTRY.get_sample_value("grok_pacs_instances_failed_total", labels)
    return sample or 0.0


def test_worker_health_follows_the_broker_and_the_bundle(tmp_path: Path) -> None:
    """A real Redis: reachable -> broker ok; stopped -> 503 naming the broker. Bundle: loaded or not."""
    redis_port, bundle = free_port(), tmp_path / "bundle"
    bundle.mkdir()
    settings = load_settings(
        data_dir=tmp_path,
        bundle=bundle,
        metrics_port=free_port(),
        bind_address="127.0.0.1",
        broker_url=f"redis://127.0.0.1:{redis_port}/0",
        min_free_disk_mb=0,
    )
    redis = Redis(tmp_path, port=redis_port)
    state = health.BundleState()
    checker = health.HealthChecker(
        {
            "broker": health.broker_check(settings),
            "bundle": health.bundle_check(settings, state),
            "disk": health.disk_check(settings),
        }
    )
    server = observability.start_server(settings, "worker", checker=checker)
    url = f"http://127.0.0.1:{server.port}/health"
    try:
        wait_for(lambda: json.loads(get(url)[1])["checks"]["broker"]["ok"], "Redis to answer", timeout=30)
        status, body = get(url)  # workers load lazily: a bundle that is there is fine before the first job
        assert status == 200 and "not loaded yet" in json.loads(body)["checks"]["bundle"]["detail"]
        assert not health.bundle_check(settings, state, require_loaded=True)().ok
        state.mark_failed("CUDA out of memory")
        status, body = get(url)
        assert status == 503 and "failed to load: CUDA out of memory" in json.loads(body)["checks"]["bundle"]["detail"]
        state.mark_loaded(bundle, "2026.10")
        status, body = get(url)
        assert status == 200, body
        assert "2026.10" in json.loads(body)["checks"]["bundle"]["detail"]

        redis.stop()
        started = time.monotonic()
        status, body = get(url)
        assert time.monotonic() - started < health.CHECK_TIMEOUT + 5  # a dead broker does not hang the probe
        broker = json.loads(body)["checks"]["broker"]
        assert status == 503 and not broker["ok"] and f"127.0.0.1:{redis_port}" in broker["detail"]
        assert get(f"http://127.0.0.1:{server.port}/health/live")[0] == 200  # alive, just not ready
    finally:
        server.close()
        redis.stop()


def test_worker_metrics_exported_in_prometheus_and_openmetrics(tmp_path: Path) -> None:
    """Job stage histograms, SR delivery outcomes and model load time, as a worker records them."""
    settings = load_settings(data_dir=tmp_path, metrics_port=free_port(), bind_address="127.0.0.1")
    server = observability.start_server(
        settings, "worker", checker=health.HealthChecker({"ok": lambda: health.CheckResult(True, "")})
    )
    try:
        before = scrape(server.port)
        with metrics.time_stage("analysis"):
            time.sleep(0.05)
        metrics.observe_stage("queue_wait", 0.75)
        metrics.sr_delivered()
        metrics.sr_delivery_failed(permanent=False)
        metrics.sr_delivery_failed(permanent=True)
        metrics.job_finished(succeeded=True)
        metrics.model_loaded("vision_encoders", 12.5, bundle=tmp_path, version="test-1")
        after = scrape(server.port)

        def delta(name: str, **labels: str) -> float:
            return value(after, name, **labels) - before.get((name, frozenset(labels.items())), 0.0)

        assert delta("grok_pacs_job_duration_seconds_count", stage="analysis") == 1
        assert delta("grok_pacs_job_duration_seconds_sum", stage="analysis") >= 0.05
        assert delta("grok_pacs_job_duration_seconds_bucket", stage="queue_wait", le="1.0") == 1
        assert delta("grok_pacs_job_duration_seconds_bucket", stage="queue_wait", le="0.5") == 0
        assert delta("grok_pacs_sr_deliveries_total") == 1
        assert delta("grok_pacs_sr_delivery_failures_total", kind="transient") == 1
        assert delta("grok_pacs_sr_delivery_failures_total", kind="permanent") == 1
        assert delta("grok_pacs_jobs_total", outcome="succeeded") == 1
        assert value(after, "grok_pacs_model_load_seconds", component="vision_encoders") == 12.5
        assert value(after, "grok_pacs_bundle_info", path=str(tmp_path), version="test-1") == 1
        with pytest.raises(ValueError, match="unknown job stage"):
            metrics.observe_stage("coffee", 1.0)

        request = urllib.request.Request(
            f"http://127.0.0.1:{server.port}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.headers["Content-Type"].startswith("application/openmetrics-text")
            assert reply.read().decode().rstrip().endswith("# EOF")
    finally:
        server.close()
        health.BUNDLE_STATE.clear()


def test_metrics_port_in_use_fails_with_the_port_named(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, metrics_port=free_port(), bind_address="127.0.0.1")
    first = observability.start_server(settings, "worker")
    try:
        with pytest.raises(OSError, match=f"metrics_port {settings.metrics_port}"):
            observability.start_server(settings, "worker")
    finally:
        first.close()


def test_sr_delivery_outcomes_are_counted(tmp_path: Path) -> None:
    """A real delivery: PACS down (transient failure), then DCMTK storescp up (delivered)."""
    from devtools.storescp import StoreSCP
    from grok_pacs.delivery.sender import DeliveryOutcome, deliver
    from grok_pacs.dicom.scu import TransientStoreError
    from tests.jobs.test_delivery import _queued_study

    port = free_port()
    settings = load_settings(
        data_dir=tmp_path / "data",
        destination=f"PACS@127.0.0.1:{port}",
        dimse_timeout=10,
        acse_timeout=10,
        network_timeout=10,
    )
    _index, outbox, sr_uid = _queued_study(settings)

    def sample(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    names = [
        ("grok_pacs_sr_delivery_failures_total", {"kind": "transient"}),
        ("grok_pacs_sr_delivery_failures_total", {"kind": "permanent"}),
        ("grok_pacs_sr_deliveries_total", {}),
        ("grok_pacs_job_duration_seconds_count", {"stage": "delivery"}),
    ]
    before = [sample(name, **labels) for name, labels in names]
    with pytest.raises(TransientStoreError):
        deliver(settings, outbox, sr_uid, owner="job-1")
    pacs = StoreSCP(port, tmp_path / "pacs").start()
    try:
        assert deliver(settings, outbox, sr_uid, owner="job-2") is DeliveryOutcome.DELIVERED
        assert deliver(settings, outbox, sr_uid, owner="job-3") is DeliveryOutcome.ALREADY_DELIVERED
    finally:
        pacs.stop()
    after = [sample(name, **labels) for name, labels in names]
    assert [a - b for a, b in zip(after, before)] == [1, 0, 1, 1]


def test_one_box_serve_metrics_from_ingest_to_delivered_sr(tmp_path: Path, tiny_bundle: Path) -> None:
    """`grok-pacs serve` end to end: storescu in, SR out to storescp, every stage visible in /metrics."""
    from devtools.storescp import StoreSCP

    bundle = tiny_bundle
    pacs = StoreSCP(free_port(), tmp_path / "pacs").start()
    dicom_port, metrics_port = free_port(), free_port()
    env = {
        "GROK_PACS_DATA_DIR": str(tmp_path / "data"),
        "GROK_PACS_PORT": str(dicom_port),
        "GROK_PACS_BIND_ADDRESS": "127.0.0.1",
        "GROK_PACS_BUNDLE": str(bundle),
        "GROK_PACS_BROKER_URL": "",
        "GROK_PACS_DESTINATION": f"PACS@127.0.0.1:{pacs.port}",
        "GROK_PACS_QUIET_PERIOD": "1",
        "GROK_PACS_ALLOWED_AES": "MODALITY",
    }
    url = f"http://127.0.0.1:{metrics_port}"
    try:
        with running(tmp_path, "serve", env, metrics_port) as log_path:
            _one_box_session(url, metrics_port, dicom_port, tmp_path, log_path)
            assert len(pacs.received_srs()) == 1 and len(pacs.received_pdfs()) == 1
    finally:
        pacs.stop()


def _one_box_session(url: str, metrics_port: int, dicom_port: int, tmp_path: Path, log_path: Path) -> None:
    """Send one analysable and one unanalysable study; check what /metrics and /health say after."""
    report = json.loads(get(f"{url}/health")[1])
    assert set(report["checks"]) == {"listener", "database", "broker", "bundle", "disk"}
    patient = Patient()
    files = [
        write(make_cfp(patient, "R"), tmp_path / "send/cfp.dcm"),
        write(make_oct(patient, "R"), tmp_path / "send/oct.dcm"),
    ]
    no_side = make_cfp(Patient(), "L")  # a second study that cannot be analysed: no laterality
    del no_side.ImageLaterality
    files.append(write(no_side, tmp_path / "send/no-side.dcm"))
    sent = storescu("-aet", "MODALITY", "-aec", "GROK_PACS", "127.0.0.1", str(dicom_port), *map(str, files))
    assert sent.returncode == 0, sent.stderr

    def finished() -> bool:
        samples = scrape(metrics_port)
        return (
            value(samples, "grok_pacs_studies", state="DONE") + value(samples, "grok_pacs_studies", state="FAILED") == 2
        )

    wait_for(finished, f"both studies to finish; log:\n{log_path.read_text()[-3000:]}", timeout=180)
    samples = scrape(metrics_port)
    assert value(samples, "grok_pacs_studies", state="DONE") == 1
    assert value(samples, "grok_pacs_instances_received_total", sop_class=OP_8BIT) == 2
    assert value(samples, "grok_pacs_instances_received_total", sop_class=OPT) == 1
    assert value(samples, "grok_pacs_jobs_total", outcome="succeeded") == 1
    assert value(samples, "grok_pacs_jobs_total", outcome="failed") == 1
    assert value(samples, "grok_pacs_sr_deliveries_total") == 1
    for stage in ("queue_wait", "analysis", "total"):
        assert value(samples, "grok_pacs_job_duration_seconds_count", stage=stage) == 2, stage
    assert value(samples, "grok_pacs_job_duration_seconds_count", stage="delivery") == 1
    # total runs from the last instance, so it includes the 1 s quiet period and the analysis.
    assert value(samples, "grok_pacs_job_duration_seconds_sum", stage="total") >= 2 * 1.0
    assert value(samples, "grok_pacs_model_load_seconds", component="bundle") > 0
    assert [v for (name, _), v in samples.items() if name == "grok_pacs_bundle_info"] == [1.0]
    assert "loaded" in json.loads(get(f"{url}/health")[1])["checks"]["bundle"]["detail"]
