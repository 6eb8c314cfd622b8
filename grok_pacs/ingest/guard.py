"""The listener's front door against hostile peers: what a connection may cost before and after it associates.

A peer's declared sizes never drive memory, and every wait has a deadline:

- **PDU lengths are checked before anything is read or allocated.** Each PDU header (6 bytes) declares its
  length; a P-DATA-TF longer than our maximum receive PDU (`max_pdu`, announced to the peer in the
  A-ASSOCIATE-AC) or any other PDU longer than `OTHER_PDU_LIMIT` is answered with an A-ABORT and the
  connection is closed, with a log line naming the peer. The body is then read into a buffer that grows
  with the bytes that actually arrive, so a declared-but-unsent length costs nothing.
- **A PDU must arrive whole within `network_timeout`** (measured from its first byte), so a peer that drips
  one byte at a time cannot hold a thread and an association slot for ever.
- **Connections that have not sent their association request cost no threads** (`grok_pacs.ingest.connections`):
  they are capped (`max_pending_connections`, a new one closes the oldest) and timed (`acse_timeout` from
  the accept), and do not count against `max_associations` (`ListenerAE.active_associations`), so half-open
  connections never starve a real PACS.
- **Admission before transfer**: `ListenerAE.maximum_associations` reads 0 (pynetdicom then rejects with
  "transient, local limit exceeded") while the admission check refuses, e.g. free disk below the reserve.

All of this sits on pynetdicom's public extension points (the server class, its request handler, an AE
subclass) and applies with and without `grok_pacs.dicom.fastpath`.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pynetdicom import AE
from pynetdicom.transport import AssociationSocket, RequestHandler

from grok_pacs.ops import metrics

log = logging.getLogger("grok_pacs.ingest.guard")

P_DATA_TF = 0x04
KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))
#: A-ASSOCIATE-RQ/AC/RJ, release and abort PDUs: even 128 presentation contexts with many transfer syntaxes
#: each stay far below this.
OTHER_PDU_LIMIT = 256 * 1024
_FIRST_CHUNK = 256 * 1024  # a body buffer starts this large (or smaller) and doubles as bytes arrive
# A-ABORT PDU: type 7, length 4, source 2 (service provider), reason 6 (invalid PDU parameter value).
_ABORT_INVALID_PARAMETER = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"


@dataclass(frozen=True)
class Limits:
    max_pdu: int  # longest P-DATA-TF body accepted (our announced maximum receive PDU)
    pdu_timeout: float  # seconds in which one PDU must arrive whole
    pending_timeout: float  # seconds from accept to a complete association request
    max_pending: int  # connections at once that have not yet sent their association request

    def pdu_limit(self, pdu_type: int) -> int:
        return self.max_pdu if pdu_type == P_DATA_TF else OTHER_PDU_LIMIT


class DropLog:
    """Log lines for dropped connections, at most `burst` per `window` seconds: a flood of hostile
    connections must not flood the log (the metric counts every one); what was held back is summed up in
    the next line that is written."""

    def __init__(self, burst: int = 20, window: float = 10.0) -> None:
        self.burst, self.window = burst, window
        self._lock = threading.Lock()
        self._window_start, self._written, self._held_back = 0.0, 0, 0

    def warning(self, message: str, *args) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._window_start >= self.window:
                self._window_start, self._written = now, 0
            if self._written >= self.burst:
                self._held_back += 1
                return
            self._written += 1
            held_back, self._held_back = self._held_back, 0
        suffix = f" ({held_back} more dropped connections not logged)" if held_back else ""
        log.warning(message + suffix, *args)


DROPS = DropLog()


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


def drop_connection(sock: socket.socket) -> None:
    """Close the transport under pynetdicom: a blocked read returns, its reactor sees the connection closed."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed by the peer or by pynetdicom
        return


def abort_peer(sock: socket.socket) -> None:
    """Tell a peer that broke the protocol why it is dropped (best effort: it may be gone already)."""
    try:
        sock.send(_ABORT_INVALID_PARAMETER)
    except OSError:
        return


def check_header(header: bytes, limits: Limits) -> tuple[int, str]:
    """(declared body length, "") for an acceptable PDU header, else (0, why it is refused)."""
    pdu_type, _, length = struct.unpack(">BBL", header)
    if pdu_type not in KNOWN_PDU_TYPES:
        return 0, f"unknown PDU type 0x{pdu_type:02X}"
    limit = limits.pdu_limit(pdu_type)
    if length > limit:
        return 0, f"PDU type 0x{pdu_type:02X} declares {length} bytes, over the limit of {limit}"
    return length, ""


class GuardedSocket(AssociationSocket):
    """pynetdicom's acceptor socket with PDU lengths checked before reading and a deadline per PDU.

    pynetdicom's DUL reads a PDU as `recv(6)` (the header) then `recv(length)` (the body); this class keeps
    that contract and checks the header between the two. The first PDU was already read by the
    `ConnectionGate` (`grok_pacs.ingest.connections`): it is served from `prefix` first.
    """

    limits: Limits
    refusal: str = ""  # why this socket closed the connection, for the association's log line

    @classmethod
    def adopt(cls, plain: AssociationSocket, limits: Limits, prefix: bytes) -> GuardedSocket:
        """This class over `plain`'s state (its construction already queued the connection event)."""
        guarded = cls.__new__(cls)
        guarded.__dict__.update(plain.__dict__)
        guarded.limits, guarded._prefix = limits, bytearray(prefix)
        guarded._expect_header, guarded._deadline = True, 0.0
        return guarded

    @property
    def ready(self) -> bool:
        return bool(self._prefix) or super().ready

    def recv(self, nr_bytes: int) -> bytearray:
        if self._prefix:
            chunk = self._prefix[:nr_bytes]
            del self._prefix[:nr_bytes]
            return chunk
        if not self._expect_header:
            self._expect_header = True
            return self._read(nr_bytes)
        self._deadline = time.monotonic() + self.limits.pdu_timeout
        header = self._read(nr_bytes)
        if len(header) != 6:
            return header
        length, refusal = check_header(bytes(header), self.limits)
        if refusal.startswith("unknown"):
            return header  # pynetdicom answers an unknown PDU itself (A-ABORT), without reading a body
        if refusal:
            self._refuse(refusal)
            return bytearray()
        self._expect_header = False
        return header

    def _read(self, nr_bytes: int) -> bytearray:
        """Up to `nr_bytes`, fewer if the peer closes or the PDU's deadline passes (the DUL then drops it).
        The buffer grows with what arrives, never with what was declared."""
        raw = self.socket
        if raw is None:
            return bytearray()
        buffer = bytearray(min(nr_bytes, _FIRST_CHUNK))
        received = 0
        previous_timeout = raw.gettimeout()
        try:
            while received < nr_bytes:
                if received == len(buffer):
                    buffer.extend(bytes(min(nr_bytes - received, len(buffer))))
                count = self._read_into(raw, buffer, received)
                if not count:
                    break
                received += count
        finally:
            _set_timeout(raw, previous_timeout)
        del buffer[received:]
        return buffer

    def _read_into(self, raw: socket.socket, buffer: bytearray, offset: int) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            self._refuse(f"a PDU did not arrive whole within {self.limits.pdu_timeout:g} s", abort=False)
            return 0
        raw.settimeout(remaining)
        with memoryview(buffer) as view:
            try:
                return raw.recv_into(view[offset:])
            except TimeoutError:
                self._refuse(f"a PDU did not arrive whole within {self.limits.pdu_timeout:g} s", abort=False)
            except OSError as exc:  # reset by the peer: the connection is gone
                log.info("connection from %s closed while reading: %s", _peer(raw), type(exc).__name__)
            return 0

    def _refuse(self, reason: str, abort: bool = True) -> None:
        """Drop the connection (after an A-ABORT when the peer broke the protocol), with a log line."""
        raw = self.socket
        if raw is None:
            return
        self.refusal = reason
        DROPS.warning("aborting connection from %s: %s", _peer(raw), reason)
        metrics.connection_dropped("pdu too long" if abort else "pdu deadline")
        if abort:
            _set_timeout(raw, 1.0)
            abort_peer(raw)
        drop_connection(raw)


def _set_timeout(raw: socket.socket, timeout: float | None) -> None:
    try:
        raw.settimeout(timeout)
    except OSError:  # closed meanwhile
        return


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler whose association reads through a `GuardedSocket`, starting with the
    association request the gate read (`GuardedServer.take_prefix`)."""

    def _create_association(self):
        assoc = super()._create_association()
        prefix = self.server.take_prefix(self.request)
        assoc.dul.socket = GuardedSocket.adopt(assoc.dul.socket, self.server.ae.guard.limits, prefix)
        return assoc


@dataclass
class Guard:
    """What the listener's AE, server and sockets share: the limits and the admission check."""

    limits: Limits
    admission: Callable[[int], str | None]  # associations already established -> reason to refuse, or None


class ListenerAE(AE):
    """The listener's AE: associations counted once established, and an admission check.

    pynetdicom counts every live acceptor thread against `maximum_associations`; here only established
    associations (and the one being negotiated) count, so a burst of connections that have not associated yet
    never takes a real PACS's slot. While `guard.admission` refuses (free disk below the reserve, say)
    `maximum_associations` reads 0, so the request is rejected as transient (local limit exceeded) before
    any instance is transferred.
    """

    guard: Guard

    @property
    def active_associations(self):
        current = threading.current_thread()
        return [a for a in super().active_associations if a.is_established or not a.is_acceptor or a is current]

    @property
    def maximum_associations(self) -> int:
        guard = getattr(self, "guard", None)
        if guard is not None:
            established = sum(1 for a in super().active_associations if a.is_acceptor and a.is_established)
            reason = guard.admission(established)
            if reason is not None:
                threading.current_thread().grok_refusal = reason  # for the rejected association's log line
                return 0
        return self._maximum_associations

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        AE.maximum_associations.fset(self, value)
