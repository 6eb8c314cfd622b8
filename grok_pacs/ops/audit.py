"""The audit trail: DICOM audit messages (PS3.15 Annex A.5, the RFC 3881-derived XML) sent as RFC 5424 syslog.

Events: application start/stop (110100 Application Activity), the instances of a study received over one
association and a result sent to the PACS (110104 DICOM Instances Transferred), an association refused for
an AE title that is not allowed (110113 Security Alert), a study deleted by retention (110105 DICOM Study
Deleted: `study_deleted()`, for the purge), a study's results withdrawn by an administrator (110103 DICOM
Instances Accessed, action D: `results_withdrawn()`, `grok-pacs withdraw`); on the review page a login or
logout (110114 User Authentication), a review and the instance it made (110103 DICOM Instances Accessed)
and a refused review (110113).
A study is identified by its Study Instance UID only: no patient
participant object (name, ID) is ever written, although the standard allows one.

Where they go is the `audit_syslog` setting ("file:PATH", "udp://HOST:PORT", "tcp://HOST:PORT"; empty = off),
set once per process by `configure()`. Sending never stops the DICOM service: a collector that is down
costs a log line (and the message), not a refused study.
"""

from __future__ import annotations

import datetime as dt
import getpass
import logging
import os
import socket
import threading
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

from grok_pacs.config import Settings
from grok_pacs.ops.phi import describe

log = logging.getLogger("grok_pacs.ops.audit")

APP_NAME = "grok-pacs"
MSGID = "IHE+RFC-3881"  # the MSGID IHE ATNA gives audit messages in this schema
FACILITY_AUTHPRIV = 10  # security/authorization messages
SEVERITY_NOTICE, SEVERITY_WARNING = 5, 4
BOM = "\ufeff"  # RFC 5424: a UTF-8 MSG starts with the byte order mark
SEND_TIMEOUT_S = 2.0

# (code, meaning) in the DCM coding scheme
APPLICATION_ACTIVITY = ("110100", "Application Activity")
INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
STUDY_DELETED = ("110105", "DICOM Study Deleted")
SECURITY_ALERT = ("110113", "Security Alert")
APPLICATION_START = ("110120", "Application Start")
APPLICATION_STOP = ("110121", "Application Stop")
NODE_AUTHENTICATION = ("110126", "Node Authentication")
ROLE_APPLICATION = ("110150", "Application")
ROLE_LAUNCHER = ("110151", "Application Launcher")
ROLE_DESTINATION = ("110152", "Destination Role ID")
ROLE_SOURCE = ("110153", "Source Role ID")
STUDY_UID_TYPE = ("110180", "Study Instance UID")
OUTCOME_SUCCESS, OUTCOME_MINOR_FAILURE, OUTCOME_SERIOUS_FAILURE = "0", "4", "8"
AUDIT_SOURCE_APPLICATION_SERVER = "4"  # AuditSourceTypeCode: application server process tier


class _Sink:
    """Where the messages go; `send` raises OSError when they cannot."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._lock = threading.Lock()  # listener threads, the worker and the main thread share one sink
        self._tcp: socket.socket | None = None
        if target.startswith("file:"):
            self.path: Path | None = Path(target.removeprefix("file:"))
            self.path.parent.mkdir(parents=True, exist_ok=True)
        else:
            self.path = None
            scheme, _, address = target.partition("://")
            host, _, port = address.rpartition(":")
            self.scheme, self.address = scheme, (host.strip("[]"), int(port))

    def send(self, message: bytes) -> None:
        with self._lock:
            if self.path is not None:
                with open(self.path, "ab") as out:  # O_APPEND: whole lines from every process sharing it
                    out.write(message + b"\n")
            elif self.scheme == "udp":
                family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
                with socket.socket(family, socket.SOCK_DGRAM) as udp:
                    udp.sendto(message, self.address)
            else:
                self._send_tcp(b"%d %s" % (len(message), message))  # RFC 6587 octet counting

    def _send_tcp(self, frame: bytes) -> None:
        for attempt in (1, 2):  # a kept connection the collector closed: reconnect once
            try:
                if self._tcp is None:
                    self._tcp = socket.create_connection(self.address, timeout=SEND_TIMEOUT_S)
                self._tcp.sendall(frame)
                return
            except OSError:
                self.close()
                if attempt == 2:
                    raise

    def close(self) -> None:
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None


class _State:
    sink: _Sink | None = None
    source_id: str = ""  # AuditSourceID: the node
    ae_title: str = ""


def configure(settings: Settings) -> None:
    """Send this process's audit messages where `settings.audit_syslog` says (empty: none)."""
    target = settings.audit_syslog
    if _State.sink is not None and _State.sink.target == target:
        return
    if _State.sink is not None:
        _State.sink.close()
    _State.sink = _Sink(target) if target else None
    _State.source_id, _State.ae_title = settings.node_id, settings.ae_title


def enabled() -> bool:
    return _State.sink is not None


# --- the events ------------------------------------------------------------------------------------
def application_started(application: str) -> None:
    _application_activity(application, APPLICATION_START)


def application_stopped(application: str) -> None:
    _application_activity(application, APPLICATION_STOP)


def _application_activity(application: str, event_type: tuple[str, str]) -> None:
    if not enabled():
        return
    root = _message(APPLICATION_ACTIVITY, "E", OUTCOME_SUCCESS, event_type)
    _participant(root, f"{APP_NAME} {application}", False, ROLE_APPLICATION, alternative=str(os.getpid()))
    _participant(root, getpass.getuser(), True, ROLE_LAUNCHER)
    _emit(root, SEVERITY_NOTICE)


def instances_received(study_uid: str, calling_ae: str, peer_host: str, sop_classes: Mapping[str, int]) -> None:
    """A study's instances stored from one association (`sop_classes`: SOP Class UID -> count)."""
    if not enabled():
        return
    root = _message(INSTANCES_TRANSFERRED, "C", OUTCOME_SUCCESS)
    _participant(root, calling_ae, True, ROLE_SOURCE, host=peer_host)
    _participant(root, _State.ae_title, False, ROLE_DESTINATION, host=_State.source_id, alternative=str(os.getpid()))
    _study(root, study_uid, sop_classes)
    _emit(root, SEVERITY_NOTICE)


def instances_delivered(study_uid: str, sop_class_uid: str, destination_ae: str, destination_host: str) -> None:
    """One result (SR, PDF report) of a study stored by the destination PACS."""
    if not enabled():
        return
    root = _message(INSTANCES_TRANSFERRED, "R", OUTCOME_SUCCESS)
    _participant(root, _State.ae_title, True, ROLE_SOURCE, host=_State.source_id, alternative=str(os.getpid()))
    _participant(root, destination_ae, False, ROLE_DESTINATION, host=destination_host)
    _study(root, study_uid, {sop_class_uid: 1})
    _emit(root, SEVERITY_NOTICE)


def security_alert(calling_ae: str, peer_host: str, reason: str) -> None:
    """An association refused because the peer is not allowed (its calling AE, or the called AE)."""
    if not enabled():
        return
    root = _message(SECURITY_ALERT, "E", OUTCOME_MINOR_FAILURE, NODE_AUTHENTICATION, description=reason)
    _participant(root, _State.ae_title, False, ROLE_APPLICATION, host=_State.source_id, alternative=str(os.getpid()))
    _participant(root, calling_ae or "-", True, host=peer_host)
    _emit(root, SEVERITY_WARNING)


def study_deleted(study_uid: str, sop_classes: Mapping[str, int] | None = None, reason: str = "retention") -> None:
    """A study's instances deleted from this node (retention/purge); `sop_classes`: SOP Class UID -> count."""
    if not enabled():
        return
    root = _message(STUDY_DELETED, "D", OUTCOME_SUCCESS, description=reason)
    _participant(root, f"{APP_NAME} {reason}", True, ROLE_APPLICATION, alternative=str(os.getpid()))
    _study(root, study_uid, sop_classes or {})
    _emit(root, SEVERITY_NOTICE)


def results_withdrawn(
    study_uid: str, username: str, reason: str, rejection_uid: str, sop_classes: Mapping[str, int]
) -> None:
    """An administrator's `grok-pacs withdraw`: the study's results (`sop_classes`, with the rejection note)
    withdrawn for `reason`, by the rejection note `rejection_uid` (110103 Instances Accessed, action Delete)."""
    if not enabled():
        return
    root = _message(
        ("110103", "DICOM Instances Accessed"),
        "D",
        OUTCOME_SUCCESS,
        description=f"withdrawn ({reason}): {rejection_uid}",
    )
    _participant(root, username or "-", True)
    _participant(
        root, f"{APP_NAME} withdraw", False, ROLE_APPLICATION, host=_State.source_id, alternative=str(os.getpid())
    )
    _study(root, study_uid, sop_classes)
    _emit(root, SEVERITY_NOTICE)


# --- the clinician review page (grok_pacs.review) ---------------------------------------------------
USER_AUTHENTICATION = ("110114", "User Authentication")
INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
LOGIN, LOGOUT = ("110122", "Login"), ("110123", "Logout")
RESTRICTED_FUNCTION = ("110132", "Use of Restricted Function")


def user_authenticated(username: str, peer_host: str, *, success: bool, logout: bool = False) -> None:
    """A clinician's login (failed or not) or logout on the review page."""
    if not enabled():
        return
    outcome = OUTCOME_SUCCESS if success else OUTCOME_MINOR_FAILURE
    root = _message(USER_AUTHENTICATION, "E", outcome, LOGOUT if logout else LOGIN)
    _participant(root, username or "-", True, host=peer_host)
    _participant(root, f"{APP_NAME} review", False, ROLE_APPLICATION, host=_State.source_id)
    _emit(root, SEVERITY_NOTICE if success else SEVERITY_WARNING)


def result_reviewed(study_uid: str, username: str, peer_host: str, what: str, sop_classes: Mapping[str, int]) -> None:
    """A clinician's review of a result (`what`: e.g. "ACCEPTED 2.25.1..."), and the instance it made."""
    if not enabled():
        return
    root = _message(INSTANCES_ACCESSED, "C", OUTCOME_SUCCESS, description=what)
    _participant(root, username, True, host=peer_host)
    _participant(root, f"{APP_NAME} review", False, ROLE_APPLICATION, host=_State.source_id)
    _study(root, study_uid, sop_classes)
    _emit(root, SEVERITY_NOTICE)


def review_refused(username: str, peer_host: str, reason: str) -> None:
    """A review asked by someone without the role, or without a valid session or CSRF token."""
    if not enabled():
        return
    root = _message(SECURITY_ALERT, "E", OUTCOME_MINOR_FAILURE, RESTRICTED_FUNCTION, description=reason)
    _participant(root, username or "-", True, host=peer_host)
    _participant(root, f"{APP_NAME} review", False, ROLE_APPLICATION, host=_State.source_id)
    _emit(root, SEVERITY_WARNING)


# --- the message -----------------------------------------------------------------------------------
def _code(parent: ET.Element, tag: str, code: tuple[str, str]) -> None:
    ET.SubElement(parent, tag, {"csd-code": code[0], "codeSystemName": "DCM", "originalText": code[1]})


def _message(
    event: tuple[str, str],
    action: str,
    outcome: str,
    event_type: tuple[str, str] | None = None,
    description: str = "",
) -> ET.Element:
    root = ET.Element("AuditMessage")
    when = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {"EventActionCode": action, "EventDateTime": when, "EventOutcomeIndicator": outcome},
    )
    _code(ident, "EventID", event)
    if event_type is not None:
        _code(ident, "EventTypeCode", event_type)
    if description:
        ET.SubElement(ident, "EventOutcomeDescription").text = description
    return root


def _participant(
    root: ET.Element,
    user_id: str,
    requestor: bool,
    role: tuple[str, str] | None = None,
    *,
    host: str = "",
    alternative: str = "",
) -> None:
    attrs = {"UserID": user_id, "UserIsRequestor": "true" if requestor else "false"}
    if alternative:
        attrs["AlternativeUserID"] = alternative
    if host:  # NetworkAccessPointTypeCode: 1 machine name, 2 IP address
        attrs["NetworkAccessPointID"] = host
        attrs["NetworkAccessPointTypeCode"] = "2" if _is_ip(host) else "1"
    participant = ET.SubElement(root, "ActiveParticipant", attrs)
    if role is not None:
        _code(participant, "RoleIDCode", role)


def _is_ip(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            continue
    return False


def _study(root: ET.Element, study_uid: str, sop_classes: Mapping[str, int]) -> None:
    """The study as participant object: type 2 (system object), role 3 (report), by Study Instance UID."""
    obj = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {"ParticipantObjectID": study_uid, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3"},
    )
    _code(obj, "ParticipantObjectIDTypeCode", STUDY_UID_TYPE)
    for uid, count in sorted(sop_classes.items()):
        ET.SubElement(obj, "SOPClass", {"UID": uid, "NumberOfInstances": str(count)})


def _emit(root: ET.Element, severity: int) -> None:
    # AuditSourceIdentification follows the participants in the schema's order, before the objects.
    source = ET.Element("AuditSourceIdentification", {"AuditSourceID": _State.source_id})
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": AUDIT_SOURCE_APPLICATION_SERVER})
    objects = root.findall("ParticipantObjectIdentification")
    root.insert(len(root) - len(objects), source)
    message = syslog_message(ET.tostring(root, encoding="unicode"), severity)
    sink = _State.sink
    if sink is None:
        return
    try:
        sink.send(message)
    except OSError as exc:  # the DICOM service goes on; the operator sees the audit trail has a gap
        log.warning("audit message not sent to %s: %s", sink.target, describe(exc))


def syslog_message(xml: str, severity: int) -> bytes:
    """RFC 5424: <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA BOM MSG."""
    pri = FACILITY_AUTHPRIV * 8 + severity
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    host = _State.source_id or "-"
    header = f"<{pri}>1 {stamp} {host} {APP_NAME} {os.getpid()} {MSGID} -"
    return f"{header} {BOM}{xml}".encode()
