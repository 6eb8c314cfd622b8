"""How pynetdicom receives for the listener: each dataset streamed into the data directory's tmp/, and
TLS handshakes done in each association's own thread.

`STORE_RECV_CHUNKED_DATASET` is a process-wide pynetdicom switch, turned on when a Listener starts. Other
SCPs in the same process then get `event.dataset` read from a file (works as before) but not
`event.encoded_dataset()`.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import threading
import weakref
from pathlib import Path

from pynetdicom import AE, _config, dimse_messages
from pynetdicom.transport import ThreadedAssociationServer

from grok_pacs.config import Settings
from grok_pacs.store.files import TMP_PREFIX

log = logging.getLogger("grok_pacs.ingest.transport")

# Each AE's temporary directory, looked up from the DUL thread that receives the dataset.
_TMP_DIRS: weakref.WeakKeyDictionary[AE, Path] = weakref.WeakKeyDictionary()
_ORIGINAL_NTF = tempfile.NamedTemporaryFile


def _named_temporary_file(*args, **kwargs):
    """pynetdicom's temporary file for a received dataset, placed in the receiving AE's `<data>/tmp`
    (there a `ReceiveFile`, which turns a full disk into a refusal instead of an abort)."""
    assoc = getattr(threading.current_thread(), "assoc", None)
    directory = _TMP_DIRS.get(getattr(assoc, "ae", None)) if assoc is not None else None
    if directory is None:
        return _ORIGINAL_NTF(*args, **kwargs)
    kwargs.setdefault("dir", directory)
    kwargs.setdefault("prefix", TMP_PREFIX)
    return ReceiveFile.open(directory, args, kwargs)


class ReceiveFile:
    """The temporary file pynetdicom streams one received dataset into (what it uses of it: `write`,
    `file.flush`, `name`, `close`).

    pynetdicom writes from its DUL thread, where an exception aborts the association without a status.
    Here a failed write (ENOSPC, EDQUOT, EIO...) is recorded in `error` instead: what was written is
    truncated and unlinked at once (the space is free for the other associations, no partial file is
    left), later writes of the same dataset are dropped, and the C-STORE handler answers the request
    with a refusal (`receive_error`), the association still usable. Unbuffered, so that a failure
    surfaces in `write` and never later in `close`.
    """

    def __init__(self, handle, name: str, error: OSError | None = None) -> None:
        self._handle = handle
        self.name = name
        self.error = error

    @classmethod
    def open(cls, directory: Path, args: tuple, kwargs: dict) -> ReceiveFile:
        try:
            handle = _ORIGINAL_NTF(*args, **{**kwargs, "buffering": 0})
        except OSError as exc:  # no inode or descriptor left: refused the same way
            return cls(None, str(directory / f"{TMP_PREFIX}unopened"), exc)
        return cls(handle, handle.name)

    @property
    def file(self) -> ReceiveFile:
        return self  # pynetdicom calls `file.flush()` after each write

    def flush(self) -> None:
        """Nothing buffered (the handler fsyncs the finished file)."""

    def write(self, data) -> int:
        if self.error is None:
            try:
                view = memoryview(data)
                while view:  # a raw write may be partial (a disk nearly full)
                    view = view[self._handle.write(view) :]
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        log.warning("receiving into %s failed (%s); the C-STORE will be refused", self.name, exc)
        os.ftruncate(self._handle.fileno(), 0)  # frees the blocks even while the descriptor is open
        self._handle.close()
        Path(self.name).unlink(missing_ok=True)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def receive_error(request) -> OSError | None:
    """The error that stopped a C-STORE request's dataset from being written (None: written whole)."""
    received = getattr(request, "_dataset_file", None)
    return received.error if isinstance(received, ReceiveFile) else None


def enable_streaming_receive() -> None:
    _config.STORE_RECV_CHUNKED_DATASET = True
    # pynetdicom's default handlers log every PDU and DIMSE message (datasets at debug level); this
    # module logs one line per association instead, and skipping them saves CPU per instance.
    _config.LOG_HANDLER_LEVEL = "none"
    dimse_messages.NamedTemporaryFile = _named_temporary_file


def receive_into(ae: AE, directory: Path) -> None:
    """Datasets received by `ae` are streamed into files in `directory` (the data dir's tmp/)."""
    _TMP_DIRS[ae] = directory


class HandshakeInThreadServer(ThreadedAssociationServer):
    """TLS handshakes in each association's thread instead of the accept loop.

    pynetdicom's server completes the handshake inside `accept`, so one client that connects and stays
    silent would block every new association. Here the socket is wrapped with a deferred handshake
    (done on the first read, in the association thread, bounded by network_timeout); a plain DICOM
    client on the TLS port fails that read and its connection is closed.
    """

    def get_request(self):
        client, address = self.socket.accept()
        if self.ssl_context is not None:
            client.settimeout(self.ae.network_timeout)
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The server TLS context from settings (client certificates required when tls_ca is set)."""
    if not settings.tls_enabled:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.tls_certificate), str(settings.tls_key))
    if settings.tls_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(str(settings.tls_ca))
    return context
