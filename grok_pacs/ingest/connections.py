"""Connections between TCP accept and a complete association request, read by one thread without pynetdicom.

pynetdicom gives every connection two threads that poll every millisecond from the moment it is accepted, so a
few hundred connections that never speak saturate the interpreter and starve real associations. Here a new
connection costs only a file descriptor and a small buffer until its first PDU (the A-ASSOCIATE-RQ) has
arrived whole: one selector thread does the TLS handshake and reads the PDU (its header checked against the
limits before the body is read), then hands the socket and the bytes read to pynetdicom.

At most `Limits.max_pending` connections wait at once (a new one closes the oldest: a real PACS sends its
request within milliseconds, so only idle or dripping peers are ever the oldest), and each must complete its
request within `Limits.pending_timeout` of the accept.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from grok_pacs.ingest.guard import DROPS, Limits, abort_peer, check_header, drop_connection
from grok_pacs.ingest.transport import HandshakeInThreadServer
from grok_pacs.ops import metrics

HandOff = Callable[[socket.socket, tuple, bytes], None]  # socket, client address, the first PDU's bytes


@dataclass(eq=False)
class _Pending:
    sock: socket.socket
    address: tuple
    started: float = field(default_factory=time.monotonic)
    buffer: bytearray = field(default_factory=bytearray)
    needed: int = 6  # the header first, then header + declared body
    handshaken: bool = False

    @property
    def peer(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"


class ConnectionGate:
    """Reads each new connection's association request in one thread, then hands the connection on."""

    def __init__(self, limits: Limits, hand_off: HandOff) -> None:
        self.limits = limits
        self._hand_off = hand_off
        self._pending: OrderedDict[socket.socket, _Pending] = OrderedDict()
        self._arrivals: deque[_Pending] = deque()
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="grok-connection-gate", daemon=True)
        self._thread.start()

    def admit(self, sock: socket.socket, address: tuple) -> None:
        """A new connection, from the accept thread: the gate's thread takes it from here."""
        self._arrivals.append(_Pending(sock, address))
        self._ring()

    def pending(self) -> int:
        return len(self._pending)

    def close_all(self) -> None:
        """Stop the gate and close every connection still waiting (the listener is stopping)."""
        self._stopped.set()
        self._ring()
        self._thread.join(timeout=5)

    def _ring(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except OSError:  # buffer full: already rung
            return

    def _run(self) -> None:
        interval = min(0.25, self.limits.pending_timeout / 4)
        while not self._stopped.is_set():
            self._take_arrivals()
            for key, events in self._selector.select(interval):
                if key.fileobj is self._wake_reader:
                    self._drain_wake()
                elif key.data in self._pending.values():
                    self._progress(key.data, events)
            self._expire()
        for pending in list(self._pending.values()):
            self._close(pending, "")
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_reader.recv(4096):
                continue
        except BlockingIOError:
            return

    def _take_arrivals(self) -> None:
        while self._arrivals:
            pending = self._arrivals.popleft()
            while len(self._pending) >= self.limits.max_pending:
                _, oldest = self._pending.popitem(last=False)
                self._close(oldest, "too many connections without an association request")
            try:
                pending.sock.setblocking(False)
                self._pending[pending.sock] = pending
                self._selector.register(pending.sock, selectors.EVENT_READ, pending)
            except (OSError, ValueError) as exc:  # closed by the peer between accept and here
                self._close(pending, f"connection failed before association ({type(exc).__name__})")
                continue
            self._progress(pending, selectors.EVENT_READ)  # TLS: the client may have spoken already

    def _expire(self) -> None:
        deadline = time.monotonic() - self.limits.pending_timeout
        while self._pending:
            oldest = next(iter(self._pending.values()))
            if oldest.started >= deadline:
                return
            self._close(oldest, f"no association request within {self.limits.pending_timeout:g} s")

    def _progress(self, pending: _Pending, events: int) -> None:
        """Read what has arrived; hand the connection on once its first PDU is whole."""
        try:
            if isinstance(pending.sock, ssl.SSLSocket) and not pending.handshaken:
                pending.sock.do_handshake()
                pending.handshaken = True
            while len(pending.buffer) < pending.needed:
                chunk = pending.sock.recv(pending.needed - len(pending.buffer))
                if not chunk:
                    self._close(pending, "")  # the peer went away: nothing to report
                    return
                pending.buffer += chunk
                if pending.needed == 6 and len(pending.buffer) == 6 and not self._header_ok(pending):
                    return
        except (ssl.SSLWantReadError, BlockingIOError):
            return
        except ssl.SSLWantWriteError:
            self._selector.modify(pending.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, pending)
            return
        except OSError as exc:  # reset, failed TLS handshake
            self._close(pending, f"connection failed before association ({type(exc).__name__})")
            return
        self._release(pending)

    def _header_ok(self, pending: _Pending) -> bool:
        length, refusal = check_header(bytes(pending.buffer), self.limits)
        if refusal:
            abort_peer(pending.sock)
            self._close(pending, refusal, reason="pdu too long" if "limit" in refusal else "protocol")
            return False
        pending.needed = 6 + length
        return True

    def _release(self, pending: _Pending) -> None:
        self._forget(pending)
        sock = pending.sock
        try:
            sock.setblocking(True)
            sock.settimeout(self.limits.pdu_timeout)
            self._hand_off(sock, pending.address, bytes(pending.buffer))
        except (OSError, RuntimeError) as exc:  # gone meanwhile, or no thread left to start: this one only
            self._close(pending, f"connection not handed on ({type(exc).__name__})", reason="hand-off failed")

    def _forget(self, pending: _Pending) -> None:
        self._pending.pop(pending.sock, None)
        try:
            self._selector.unregister(pending.sock)
        except (KeyError, ValueError):  # never registered (closed on arrival)
            return

    def _close(self, pending: _Pending, why: str, reason: str = "no association request") -> None:
        self._forget(pending)
        if why:
            DROPS.warning("closing connection from %s: %s", pending.peer, why)
            metrics.connection_dropped(reason)
        drop_connection(pending.sock)
        pending.sock.close()


class GuardedServer(HandshakeInThreadServer):
    """The listener's server: a new connection goes to the `ConnectionGate`; pynetdicom's threads start only
    once its association request has arrived whole."""

    # The kernel's queue of connections not yet accepted: socketserver's 5 drops a burst's SYNs (the peer
    # retries a second later), so many PACS connections at once, or a flood, would stall real senders.
    request_queue_size = 1024

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._prefixes: dict[socket.socket, bytes] = {}
        self._prefix_lock = threading.Lock()
        self.gate = ConnectionGate(self.ae.guard.limits, self._hand_off)

    def process_request(self, request, client_address) -> None:
        self.gate.admit(request, client_address)

    def take_prefix(self, sock: socket.socket) -> bytes:
        """What the gate read from `sock` (its association request), for the association's socket."""
        with self._prefix_lock:
            return self._prefixes.pop(sock, b"")

    def server_close(self) -> None:
        self.gate.close_all()
        super().server_close()

    def _hand_off(self, sock: socket.socket, address: tuple, prefix: bytes) -> None:
        with self._prefix_lock:
            self._prefixes[sock] = prefix
        super().process_request(sock, address)
