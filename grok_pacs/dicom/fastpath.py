"""The pynetdicom fast path (setting `pynetdicom_fast_path`, on by default): event-driven wakeups of
pynetdicom 3.0's polling threads, bulk reads, direct encoding. Process-wide while installed (in `serve`
also the SR sender); `uninstall()` restores pynetdicom as released.

pynetdicom's two threads per association poll: the DUL thread (socket reader / PDU writer) and the
association thread (runs the C-STORE handler) each sleep 1 ms whenever a loop found nothing to do, so
every C-STORE waits for several sleeps; on a busy 2-core machine each sleep lasts much longer than
1 ms. That dominates small-instance throughput. Installed here:

- The same 1 ms waits end early when there is work: the DUL thread waits with `select` on its socket
  and on a wake-up socket rung when a primitive is queued for sending; the association thread waits on
  an event set when a DIMSE message or an ACSE primitive is queued for it. Timeouts, and every other
  sleep, are unchanged, so the polling logic behaves as before, only without the idle delay.
- `AssociationSocket.recv` reads into a buffer that grows with the bytes that arrive (never sized by the
  peer's declared length alone) instead of 4 KiB `recv` calls.
- C-STORE responses (status only) are encoded directly instead of through a pydicom dataset, byte for
  byte the same; other messages (a failure with an ErrorComment, say), or any association with an
  EVT_DIMSE_SENT handler, go the usual way (`grok_pacs.dicom.direct_codec`).
- The file meta of each received dataset (STORE_RECV_CHUNKED_DATASET) is encoded directly instead of
  through a pydicom dataset, and records the calling AE as SourceApplicationEntityTitle.

Internals used (pynetdicom 3.0): the module-level `time` of `pynetdicom.dul` and `.association`, and
`create_file_meta`/`write_file_meta_info` of `.dimse_messages`; the
DUL's `to_provider_queue`/`to_user_queue`/`event_queue`/`socket`, `DIMSEServiceProvider.msg_queue`,
`AssociationSocket._is_connected`. `install()` checks for them and leaves pynetdicom untouched (with a
warning) if they are missing.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable

from pynetdicom import association as _association
from pynetdicom import dimse as _dimse
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom import dul as _dul
from pynetdicom import evt as _evt
from pynetdicom import transport as _transport
from pynetdicom.dimse_primitives import C_STORE as _C_STORE
from pynetdicom.pdu_primitives import P_DATA as _P_DATA

from grok_pacs.dicom.direct_codec import create_file_meta, encode_store_response, write_file_meta_info

log = logging.getLogger("grok_pacs.dicom.fastpath")

POLL_DELAY = 0.001  # the reactors' idle sleep in pynetdicom 3 (dul._run_loop_delay, association loop)
_real_sleep = time.sleep
_lock = threading.Lock()
_installed = False


class _RingingQueue(queue.Queue):
    """A Queue that calls `ring()` after every put (wakes the thread that consumes it)."""

    def __init__(self, ring: Callable[[], None]) -> None:
        super().__init__()
        self._ring = ring

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._ring()


class _WakeSocket:
    """A socketpair that `select` can wait on next to the association socket."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)

    def ring(self) -> None:
        try:
            self.writer.send(b"\0")
        except OSError:  # buffer full (already rung) or closed (DUL finished): nobody left to wake
            return

    def drain(self) -> None:
        try:
            while self.reader.recv(4096):
                continue
        except OSError:  # BlockingIOError: drained
            return

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


def _dul_wait(dul, wake: _WakeSocket, seconds: float) -> None:
    """The DUL's idle wait: until socket data, a primitive to send, or the timeout."""
    if dul.to_provider_queue.qsize() or dul.event_queue.qsize():
        return
    watch = [wake.reader]
    assoc_socket = getattr(dul, "socket", None)
    raw = getattr(assoc_socket, "socket", None)
    if raw is not None and getattr(assoc_socket, "_is_connected", False) and raw.fileno() >= 0:
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return
        watch.append(raw)
    try:
        select.select(watch, [], [], seconds)
    except (OSError, ValueError):  # the socket was closed meanwhile: the DUL notices on its next loop
        return
    wake.drain()


def _association_wait(event: threading.Event, seconds: float) -> None:
    event.wait(seconds)
    event.clear()


class _TimeModule:
    """Stands in for `time` inside pynetdicom's dul and association modules; only `sleep` differs."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        waiter = getattr(threading.current_thread(), "_grok_wait", None)
        if waiter is None or seconds != POLL_DELAY:
            _real_sleep(seconds)
        else:
            waiter(seconds)


def _patch_dul(cls) -> None:
    original_init, original_reactor = cls.__init__, cls.run_reactor

    def __init__(self, *args, **kwargs) -> None:
        original_init(self, *args, **kwargs)
        wake = _WakeSocket()
        self._grok_wake = wake
        self.to_provider_queue = _RingingQueue(wake.ring)
        self._grok_wait = lambda seconds: _dul_wait(self, wake, seconds)

    def run_reactor(self) -> None:
        try:
            original_reactor(self)
        finally:
            self._grok_wake.close()

    cls.__init__, cls.run_reactor = __init__, run_reactor


def _patch_association(cls) -> None:
    original_init = cls.__init__

    def __init__(self, *args, **kwargs) -> None:
        original_init(self, *args, **kwargs)
        event = threading.Event()
        self.dimse.msg_queue = _RingingQueue(event.set)
        self.dul.to_user_queue = _RingingQueue(event.set)
        self._grok_wait = lambda seconds: _association_wait(event, seconds)

    cls.__init__ = __init__


_FIRST_CHUNK = 256 * 1024  # a read's buffer starts this large (or smaller) and doubles as bytes arrive


def _recv(self, nr_bytes: int) -> bytearray:
    """Read `nr_bytes` (fewer only if the connection closed) into a buffer that grows with what arrives: the
    length comes from the peer's PDU header, so it must never size an allocation by itself. (The listener's
    sockets read through grok_pacs.ingest.guard, which also checks the length; this serves the SCU side.)"""
    buffer = bytearray(min(nr_bytes, _FIRST_CHUNK))
    received = 0
    while received < nr_bytes:
        if received == len(buffer):
            buffer.extend(bytes(min(nr_bytes - received, len(buffer))))
        with memoryview(buffer) as view:
            count = self.socket.recv_into(view[received:], nr_bytes - received)
        if not count:
            break
        received += count
    del buffer[received:]
    return buffer


def _patch_send_msg(cls) -> None:
    """C-STORE responses (one per received instance) encoded directly; all else as before."""
    original = cls.send_msg

    def send_msg(self, primitive, context_id: int) -> None:
        if type(primitive) is _C_STORE and not self.assoc.get_handlers(_evt.EVT_DIMSE_SENT):
            command = encode_store_response(primitive)
            limit = self.maximum_pdu_size
            if command is not None and (not limit or len(command) + 6 <= limit):
                pdata = _P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
                self.dul.send_pdu(pdata)
                return
        original(self, primitive, context_id)

    cls.send_msg = send_msg


def _internals_present() -> bool:
    dul_source = _dul.DULServiceProvider.__init__.__code__.co_names
    return (
        hasattr(_dul, "time")
        and hasattr(_association, "time")
        and hasattr(_dimse.DIMSEServiceProvider, "send_msg")
        and hasattr(_C_STORE(), "ErrorComment")
        and hasattr(_dimse_messages, "create_file_meta")
        and hasattr(_dimse_messages, "write_file_meta_info")
        and "to_provider_queue" in dul_source
        and "_run_loop_delay" in dul_source
        and hasattr(_transport.AssociationSocket, "recv")
    )


# Every attribute `install` replaces, as pynetdicom defines it: `uninstall` puts these back.
_RELEASED = [
    (owner, name, getattr(owner, name))
    for owner, name in (
        (_dul.DULServiceProvider, "__init__"),
        (_dul.DULServiceProvider, "run_reactor"),
        (_association.Association, "__init__"),
        (_dul, "time"),
        (_association, "time"),
        (_transport.AssociationSocket, "recv"),
        (_dimse_messages, "create_file_meta"),
        (_dimse.DIMSEServiceProvider, "send_msg"),
        (_dimse_messages, "write_file_meta_info"),
    )
]


def install() -> bool:
    """Apply the fast path once per process; False (pynetdicom unchanged) if its internals differ."""
    global _installed
    with _lock:
        if _installed:
            return True
        if not _internals_present():
            log.warning("pynetdicom internals differ from 3.0: running without the fast path")
            return False
        _patch_dul(_dul.DULServiceProvider)
        _patch_association(_association.Association)
        _dul.time = _association.time = _TimeModule()
        _transport.AssociationSocket.recv = _recv
        _dimse_messages.create_file_meta = create_file_meta
        _patch_send_msg(_dimse.DIMSEServiceProvider)
        _dimse_messages.write_file_meta_info = write_file_meta_info
        _installed = True
        return True


def uninstall() -> None:
    """pynetdicom as released again (setting `pynetdicom_fast_path` off). Associations opened with the
    fast path keep their queues; switch it only while no association is open (a listener's start)."""
    global _installed
    with _lock:
        for owner, name, value in _RELEASED:
            setattr(owner, name, value)
        _installed = False


def installed() -> bool:
    return _installed
