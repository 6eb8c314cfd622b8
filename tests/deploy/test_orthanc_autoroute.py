"""The Orthanc auto-routing script (deploy/compose/orthanc/autoroute.lua) in a real Orthanc: OP and OPT forwarded
to grok-pacs, nothing else; the deploy guide quotes the shipped script."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from devtools.ports import free_port
from grok_pacs.config import load_settings
from tests.conftest import require_tool
from tests.helpers.deploy_files import DEPLOY, ROOT
from tests.helpers.ophthalmic_dicom import Patient, make_cfp, make_oct, write


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
