"""TLS: DCMTK storescu +tls with certificates made by the test; plain DICOM on the TLS port fails cleanly."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from devtools.sample_dicom import fundus_photograph, write
from tests.conftest import require_tool
from tests.helpers.ingest_support import dcmtk, echoscu, ingest_settings, running, stored_files, storescu


def _openssl(*args: str) -> None:
    subprocess.run([require_tool("openssl"), *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    root = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(root / "ca.key"),
        "-out",
        str(root / "ca.crt"),
        "-days",
        "2",
        "-subj",
        "/CN=grok-pacs test CA",
    )
    extensions = root / "san.cnf"
    extensions.write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(root / f"{name}.key"),
            "-out",
            str(root / f"{name}.csr"),
            "-subj",
            f"/CN=grok-pacs test {name}",
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            str(root / f"{name}.csr"),
            "-CA",
            str(root / "ca.crt"),
            "-CAkey",
            str(root / "ca.key"),
            "-CAcreateserial",
            "-out",
            str(root / f"{name}.crt"),
            "-days",
            "2",
            "-extfile",
            str(extensions),
        )
    return root


def test_tls_store_with_client_certificate_and_plain_peer_refused(pki: Path, tmp_path: Path, fast_path: bool) -> None:
    settings = ingest_settings(
        tmp_path,
        tls_certificate=pki / "server.crt",
        tls_key=pki / "server.key",
        tls_ca=pki / "ca.crt",
        pynetdicom_fast_path=fast_path,
    )
    tls = ("+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt"))
    instance = write(fundus_photograph(generate_uid(), "R", size=64), tmp_path / "cfp.dcm")
    with running(settings) as service:
        # A client that connects and says nothing must not hold up anyone else's handshake.
        with socket.create_connection(("127.0.0.1", service.port), timeout=5):
            started = time.monotonic()
            done = storescu(service.port, instance, options=("-xy", *tls))
            assert done.returncode == 0, done.stderr
            assert time.monotonic() - started < 10
        plain = echoscu(service.port, options=("-to", "5", "-ta", "5"))
        assert plain.returncode != 0, "a plain association to the TLS port must fail"
        no_client_cert = dcmtk(
            "echoscu",
            "+tla",
            "+cf",
            str(pki / "ca.crt"),
            "-aec",
            "GROK_PACS",
            "127.0.0.1",
            str(service.port),
            "-to",
            "5",
        )
        assert no_client_cert.returncode != 0, "tls_ca set: a client without a certificate is refused"
        assert echoscu(service.port, options=tls).returncode == 0, "the TLS listener still serves"
    assert len(stored_files(settings)) == 1
