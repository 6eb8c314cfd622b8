"""How pynetdicom receives for the listener: each dataset streamed into the data directory's tmp/, and
TLS handshakes done in each association's own thread.

`STORE_RECV_CHUNKED_DATASET` is a process-wide pynetdicom switch, turned on when a Listener starts. Other
SCPs in the same process then get `event.dataset` read from a file (works as before) but not
`event.encoded_dataset()`.
"""

from __future__ import annotations

import ssl
import tempfile
import threading
import weakref
from pathlib import Path

from pynetdicom import AE, _config, dimse_messages
from pynetdicom.transport import ThreadedAssociationServer

from grok_pacs.config import Settings
from grok_pacs.store.files import TMP_PREFIX

# Each AE's temporary directory, looked up from the DUL thread that receives the dataset.
_TMP_DIRS: weakref.WeakKeyDictionary[AE, Path] = weakref.WeakKeyDictionary()
_ORIGINAL_NTF = tempfile.NamedTemporaryFile


def _named_temporary_file(*args, **kwargs):
    """pynetdicom's temporary file for a received dataset, placed in the receiving AE's `<data>/tmp`."""
    assoc = getattr(threading.current_thread(), "assoc", None)
    directory = _TMP_DIRS.get(getattr(assoc, "ae", None)) if assoc is not None else None
    if directory is not None:
        kwargs.setdefault("dir", directory)
        kwargs.setdefault("prefix", TMP_PREFIX)
    return _ORIGINAL_NTF(*args, **kwargs)


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
