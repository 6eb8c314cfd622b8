"""The audit trail: DICOM audit messages (PS3.15 A.5 XML) as RFC 5424 syslog, received by real collectors.

A UDP collector on loopback hears a real listener start, receive a study from DCMTK storescu (one message
for the study, with the calling AE and the study UID), refuse an AE title that is not allowed (a security
alert) and stop. A TCP collector (RFC 6587 octet counting) hears an SR delivered to a DCMTK storescp and a
study deleted by retention. No message carries the patient's ID.
"""

from __future__ import annotations

import re
import socket
import xml.etree.ElementTree as ET

import pytest

from devtools.ports import free_port
from devtools.storescp import StoreSCP
from grok_pacs.config import load_settings
from grok_pacs.delivery.sender import DeliveryOutcome, deliver
from grok_pacs.ops import audit
from tests.helpers.ingest_support import echoscu, img2dcm_fundus, ingest_settings, running, storescu
from tests.jobs.test_delivery import _queued_study, _settings

# <PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP STRUCTURED-DATA SP BOM MSG
HEADER = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (?P<host>[!-~]{1,255}) grok-pacs "
    rb"(?P<pid>\d+) IHE\+RFC-3881 - \xef\xbb\xbf(?P<msg><AuditMessage>.*</AuditMessage>)$",
    re.DOTALL,
)
STUDY = "1.2.826.0.1.3680043.10.1234.77"


@pytest.fixture(autouse=True)
def _audit_off_after(tmp_path):
    yield
    audit.configure(load_settings(data_dir=tmp_path / "off"))  # the module is process-wide: leave it off


class UdpCollector:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.url = f"udp://127.0.0.1:{self.sock.getsockname()[1]}"

    def take(self, count: int) -> list[bytes]:
        return [self.sock.recvfrom(65535)[0] for _ in range(count)]


class TcpCollector:
    """Accepts one connection and splits its stream into RFC 6587 octet-counted frames."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(10)
        self.url = f"tcp://127.0.0.1:{self.server.getsockname()[1]}"
        self.buffer = b""
        self.conn: socket.socket | None = None

    def take(self, count: int) -> list[bytes]:
        if self.conn is None:
            self.conn, _ = self.server.accept()
            self.conn.settimeout(10)
        frames = []
        while len(frames) < count:
            length, sep, rest = self.buffer.partition(b" ")
            if sep and len(rest) >= int(length):
                frames.append(rest[: int(length)])
                self.buffer = rest[int(length) :]
                continue
            chunk = self.conn.recv(65536)
            assert chunk, "collector connection closed"
            self.buffer += chunk
        return frames


def parse(message: bytes) -> ET.Element:
    """Check the RFC 5424 header and the audit message's required structure; return the XML root."""
    header = HEADER.match(message)
    assert header, message[:200]
    assert int(header["pri"]) // 8 == 10  # facility: security/authorization
    root = ET.fromstring(header["msg"].decode())
    tags = [child.tag for child in root]
    assert tags[0] == "EventIdentification"
    assert "ActiveParticipant" in tags
    assert tags.index("AuditSourceIdentification") > max(i for i, t in enumerate(tags) if t == "ActiveParticipant")
    event = root.find("EventIdentification")
    assert event.get("EventActionCode") in {"C", "R", "U", "D", "E"}
    assert event.get("EventOutcomeIndicator") in {"0", "4", "8", "12"}
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", event.get("EventDateTime"))
    assert event.find("EventID").get("codeSystemName") == "DCM"
    source = root.find("AuditSourceIdentification")
    assert source.get("AuditSourceID") and source.find("AuditSourceTypeCode").get("csd-code") == "4"
    for participant in root.findall("ActiveParticipant"):
        assert participant.get("UserID") and participant.get("UserIsRequestor") in {"true", "false"}
    return root


def event_of(root: ET.Element) -> tuple[str, str, str | None]:
    """(EventID code, EventActionCode, EventTypeCode code or None)."""
    event = root.find("EventIdentification")
    kind = event.find("EventTypeCode")
    return (
        event.find("EventID").get("csd-code"),
        event.get("EventActionCode"),
        None if kind is None else kind.get("csd-code"),
    )


def participant(root: ET.Element, role: str) -> ET.Element:
    found = [p for p in root.findall("ActiveParticipant") if p.find(f"RoleIDCode[@csd-code='{role}']") is not None]
    assert len(found) == 1, ET.tostring(root)
    return found[0]


def study_object(root: ET.Element) -> ET.Element:
    (obj,) = root.findall("ParticipantObjectIdentification")
    assert obj.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
    assert (obj.get("ParticipantObjectTypeCode"), obj.get("ParticipantObjectTypeCodeRole")) == ("2", "3")
    return obj


def test_listener_audits_start_study_received_refused_ae_and_stop(tmp_path):
    collector = UdpCollector()
    settings = ingest_settings(tmp_path, audit_syslog=collector.url, allowed_aes=["TESTSCU"])
    files = [img2dcm_fundus(tmp_path / eye, STUDY, eye) for eye in ("R", "L")]
    with running(settings) as service:
        (started,) = map(parse, collector.take(1))
        assert event_of(started) == ("110100", "E", "110120")
        assert participant(started, "110150").get("UserID") == "grok-pacs listener"
        sent = storescu(service.port, *files, options=("-xy",))  # propose JPEG baseline
        assert sent.returncode == 0, sent.stderr
        received = parse(collector.take(1)[0])
        refused = echoscu(service.port, calling="INTRUDER")
        assert refused.returncode != 0
        alert = parse(collector.take(1)[0])
    (stopped,) = map(parse, collector.take(1))

    assert event_of(received) == ("110104", "C", None)
    source = participant(received, "110153")
    assert (source.get("UserID"), source.get("UserIsRequestor"), source.get("NetworkAccessPointID")) == (
        "TESTSCU",
        "true",
        "127.0.0.1",
    )
    assert participant(received, "110152").get("UserID") == settings.ae_title
    obj = study_object(received)
    assert obj.get("ParticipantObjectID") == STUDY
    assert [(c.get("UID"), c.get("NumberOfInstances")) for c in obj.findall("SOPClass")] == [
        ("1.2.840.10008.5.1.4.1.1.77.1.5.1", "2")  # Ophthalmic Photography 8 Bit
    ]
    assert event_of(alert) == ("110113", "E", "110126")
    assert alert.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert "not allowed" in alert.find("EventIdentification/EventOutcomeDescription").text
    assert [p.get("UserID") for p in alert.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"] == [
        "INTRUDER"
    ]
    assert event_of(stopped) == ("110100", "E", "110121")


def test_delivery_and_retention_are_audited_over_tcp_without_patient_id(tmp_path):
    collector = TcpCollector()
    pacs = StoreSCP(free_port(), tmp_path / "pacs").start()
    try:
        settings = _settings(tmp_path / "grok", f"PACS@127.0.0.1:{pacs.port}", audit_syslog=collector.url)
        index, outbox, sr_uid = _queued_study(settings)
        audit.configure(settings)
        assert deliver(settings, outbox, sr_uid, owner="job-1") is DeliveryOutcome.DELIVERED
        study_uid = outbox.get(sr_uid).study_uid
        audit.study_deleted(study_uid, {"1.2.840.10008.5.1.4.1.1.77.1.5.1": 1})
        frames = collector.take(2)
    finally:
        pacs.stop()
    delivered, deleted = map(parse, frames)
    assert event_of(delivered) == ("110104", "R", None)
    assert participant(delivered, "110153").get("UserIsRequestor") == "true"
    destination = participant(delivered, "110152")
    assert (destination.get("UserID"), destination.get("NetworkAccessPointID")) == ("PACS", "127.0.0.1")
    obj = study_object(delivered)
    assert obj.get("ParticipantObjectID") == study_uid
    assert obj.find("SOPClass").get("UID") == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert event_of(deleted) == ("110105", "D", None)
    assert study_object(deleted).get("ParticipantObjectID") == study_uid
    for frame in frames:  # the study is named by its UID only: no patient participant object
        assert b"GROK-TEST-001" not in frame and b"Test^Retina" not in frame
        assert b'ParticipantObjectTypeCode="1"' not in frame


def test_audit_to_a_file_appends_one_message_a_line(tmp_path):
    path = tmp_path / "audit" / "grok-audit.log"
    audit.configure(load_settings(data_dir=tmp_path / "grok", audit_syslog=f"file:{path}"))
    audit.application_started("worker")
    audit.application_stopped("worker")
    lines = path.read_bytes().splitlines()
    assert [event_of(parse(line))[2] for line in lines] == ["110120", "110121"]


@pytest.mark.parametrize("target", ["syslog://host:514", "udp://host", "file:", "tcp://:514"])
def test_audit_target_must_be_file_udp_or_tcp(tmp_path, target):
    with pytest.raises(Exception, match="audit_syslog"):
        load_settings(data_dir=tmp_path, audit_syslog=target)
