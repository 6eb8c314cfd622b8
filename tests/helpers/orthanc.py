"""Orthanc (the Debian package) as a real PACS for tests: started on free loopback ports with a config
file the test writes, storage and index under the test's temporary directory, REST API over httpx.
With `dicomweb=True` it loads Debian's DICOMweb plugin (`orthanc-dicomweb`), served under /dicom-web/.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from devtools.ports import free_port
from devtools.processes import GrokProcess, grok_env
from tests.conftest import require_tool

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def dicomweb_plugin() -> Path:
    """The DICOMweb plugin's library; fails (never skips) when the package is missing."""
    if not DICOMWEB_PLUGIN.is_file():
        pytest.fail(f"{DICOMWEB_PLUGIN} is missing: install orthanc-dicomweb (scripts/install-system-deps.sh)")
    return DICOMWEB_PLUGIN


class Orthanc:
    """One Orthanc process; `modalities` maps a name to (AE, host, port) for DicomModalities."""

    def __init__(
        self, work_dir: Path, modalities: dict[str, tuple[str, str, int]], aet: str = "ORTHANC", dicomweb: bool = False
    ) -> None:
        self.work_dir = Path(work_dir)
        self.aet = aet
        self.http_port, self.dicom_port = free_port(), free_port()
        self.config_path = self.work_dir / "orthanc.json"
        self.log_path = self.work_dir / "orthanc.log"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "grok-pacs-test",
            "StorageDirectory": str(self.work_dir / "storage"),
            "IndexDirectory": str(self.work_dir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": aet,
            "RemoteAccessAllowed": False,  # HTTP from localhost only
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": False,  # only the modalities below may store (grok-pacs does)
            "DicomModalities": {name: list(peer) for name, peer in modalities.items()},
            "Plugins": [],
            "SaveJobs": False,
            "StableAge": 1,
            "HttpTimeout": 60,
            "DicomScuTimeout": 30,
        }
        if dicomweb:
            config["Plugins"] = [str(dicomweb_plugin())]
            # Full metadata from the stored files: viewers need pixel-module and SR tags, not only main tags.
            config["DicomWeb"] = {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            }
        self.config_path.write_text(json.dumps(config, indent=2))
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def start(self, timeout: float = 60.0) -> Orthanc:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [require_tool("Orthanc"), str(self.config_path)], stdout=log, stderr=subprocess.STDOUT, cwd=self.work_dir
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"Orthanc exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}"
                )
            try:
                if self.http.get("/system").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"Orthanc did not answer on port {self.http_port} within {timeout} s")

    def stop(self) -> None:
        self.http.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    # --- REST helpers ------------------------------------------------------------------------------------
    def upload(self, path: Path) -> dict:
        """POST /instances: store a DICOM file in Orthanc."""
        response = self.http.post(
            "/instances", content=Path(path).read_bytes(), headers={"Content-Type": "application/dicom"}
        )
        response.raise_for_status()
        return response.json()

    def send_to_modality(self, modality: str, resources: list[str]) -> dict:
        """POST /modalities/{id}/store: Orthanc C-STOREs the resources to a configured modality."""
        response = self.http.post(f"/modalities/{modality}/store", json={"Resources": resources, "Synchronous": True})
        response.raise_for_status()
        return response.json()

    def get(self, path: str):
        response = self.http.get(path)
        response.raise_for_status()
        return response.json()

    def file(self, instance_id: str) -> bytes:
        response = self.http.get(f"/instances/{instance_id}/file")
        response.raise_for_status()
        return response.content


def serve_for(orthanc: Orthanc, work: Path, bundle: Path, port: int, ae_title: str) -> GrokProcess:
    """`grok-pacs serve` on `port` as Orthanc's modality: accepts only ORTHANC, delivers back into it."""
    settings = dict(
        data_dir=work / "grok",
        bundle=bundle,
        port=port,
        bind_address="127.0.0.1",
        ae_title=ae_title,
        allowed_aes="ORTHANC",
        quiet_period=1,
        destination=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
    )
    return GrokProcess(["serve"], grok_env(**settings), work / "serve.log")
