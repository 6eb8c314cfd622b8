"""Result delivery over TLS to DCMTK `storescp +tls`: server-authenticated and mutual TLS deliver the SR; a wrong
CA, a host name the certificate does not carry and a missing client certificate fail with a reason that says so.

Certificates come from tests/ingest/test_ingest_tls.py's `pki` fixture (a CA, server and client certificates for
127.0.0.1), plus a second CA here that signed nothing the PACS has.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from devtools.ports import free_port
from devtools.storescp import StoreSCP
from grok_pacs.config import Peer, SettingsError, load_settings
from grok_pacs.delivery.sender import DeliveryOutcome, deliver
from grok_pacs.dicom import fastpath
from grok_pacs.dicom.scu import TransientStoreError, store_dataset
from grok_pacs.dicom.tls import delivery_context
from grok_pacs.store.outbox import OutboxState
from tests.ingest.test_ingest_tls import _openssl, pki  # noqa: F401 - pki is a fixture used by name
from tests.jobs.test_delivery import _queued_study, _settings


@pytest.fixture(scope="module")
def wrong_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA certificate that signed nothing the PACS presents."""
    root = tmp_path_factory.mktemp("wrong-ca")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(root / "ca.key"),
        "-out", str(root / "ca.crt"), "-days", "2", "-subj", "/CN=some other CA",
    )  # fmt: skip
    return root / "ca.crt"


def _tls_pacs(port: int, out_dir: Path, pki: Path, *, client_certificate: bool) -> StoreSCP:  # noqa: F811
    """storescp +tls with the server certificate; requiring a client certificate signed by the CA, or none."""
    peer_auth = ("+cf", str(pki / "ca.crt"), "-rc") if client_certificate else ("-ic",)
    options = ("+tls", str(pki / "server.key"), str(pki / "server.crt"), *peer_auth)
    return StoreSCP(port, out_dir, options=options).start()


def _sr(settings, outbox, sr_uid: str) -> pydicom.Dataset:
    return pydicom.dcmread(settings.data_dir / outbox.get(sr_uid).path)


def test_sr_delivered_over_tls_and_a_wrong_ca_or_host_name_says_why(
    tmp_path: Path,
    pki: Path,  # noqa: F811
    wrong_ca: Path,
) -> None:
    port = free_port()
    settings = _settings(tmp_path / "data", f"PACS@127.0.0.1:{port}", destination_tls_ca=pki / "ca.crt")
    _, outbox, sr_uid = _queued_study(settings)
    pacs = _tls_pacs(port, tmp_path / "pacs", pki, client_certificate=False)
    try:
        wrong = load_settings(**{**settings.model_dump(), "destination_tls_ca": wrong_ca})
        with pytest.raises(TransientStoreError, match="certificate was not accepted: unable to get local issuer"):
            deliver(wrong, outbox, sr_uid, owner="job-1")
        entry = outbox.get(sr_uid)
        assert entry.state is OutboxState.PENDING and "certificate was not accepted" in entry.last_error
        assert pacs.received() == []

        assert deliver(settings, outbox, sr_uid, owner="job-2") is DeliveryOutcome.DELIVERED
        assert pacs.received_sop_uids() == [sr_uid]
        assert str(pacs.received_srs()[0].PatientID) == str(_sr(settings, outbox, sr_uid).PatientID)

        # The certificate names 127.0.0.1 only: reached as "localhost" it is refused, by name.
        by_name = Peer.parse(f"PACS@localhost:{port}")
        with pytest.raises(TransientStoreError, match="certificate was not accepted: Hostname mismatch"):
            store_dataset(by_name, _sr(settings, outbox, sr_uid), "GROK_PACS", 10, tls=delivery_context(settings))
        # Without TLS the PACS's TLS port stores nothing.
        with pytest.raises(TransientStoreError):
            store_dataset(settings.destination, _sr(settings, outbox, sr_uid), "GROK_PACS", 10)
        assert len(pacs.received()) == 1
    finally:
        pacs.stop()


@pytest.fixture
def sender_path(fast_path: bool) -> Iterator[bool]:
    """The SR sender with grok_pacs.dicom.fastpath installed (as in `serve`) and with pynetdicom as released."""
    was_installed = fastpath.installed()
    fastpath.install() if fast_path else fastpath.uninstall()
    yield fast_path
    fastpath.install() if was_installed else fastpath.uninstall()


def test_mutual_tls_delivers_with_the_client_certificate_only(
    tmp_path: Path,
    pki: Path,  # noqa: F811
    sender_path: bool,
) -> None:
    """In TLS 1.3 the PACS refuses a missing client certificate after our handshake: on the first read."""
    port = free_port()
    client = {"destination_tls_certificate": pki / "client.crt", "destination_tls_key": pki / "client.key"}
    settings = _settings(tmp_path / "data", f"PACS@127.0.0.1:{port}", destination_tls_ca=pki / "ca.crt", **client)
    _, outbox, sr_uid = _queued_study(settings)
    pacs = _tls_pacs(port, tmp_path / "pacs", pki, client_certificate=True)
    try:
        no_certificate = load_settings(**{**settings.model_dump(), "destination_tls_certificate": None,
                                          "destination_tls_key": None})  # fmt: skip
        with pytest.raises(TransientStoreError, match="TLS connection .* failed: the peer requires a client cert"):
            store_dataset(settings.destination, _sr(settings, outbox, sr_uid), "GROK_PACS", 10,
                          tls=delivery_context(no_certificate))  # fmt: skip
        assert pacs.received() == []
        assert deliver(settings, outbox, sr_uid, owner="job-1") is DeliveryOutcome.DELIVERED
        assert pacs.received_sop_uids() == [sr_uid]
    finally:
        pacs.stop()


def test_delivery_tls_settings_are_checked_at_start(pki: Path) -> None:  # noqa: F811
    with pytest.raises(SettingsError, match="destination_tls_certificate needs destination_tls_ca"):
        load_settings(destination_tls_certificate=pki / "client.crt", destination_tls_key=pki / "client.key")
    with pytest.raises(SettingsError, match="destination_tls_certificate and destination_tls_key"):
        load_settings(destination_tls_ca=pki / "ca.crt", destination_tls_certificate=pki / "client.crt")
    with pytest.raises(SettingsError, match="destination_tls_ca: file"):
        load_settings(destination_tls_ca=pki / "missing.crt")
