"""TLS for associations we open (result delivery to the PACS): the client context and a readable failure.

pynetdicom only logs a failed TLS handshake and then reports "cannot connect", which reads like a network
problem. The context made here records the handshake error on itself (`handshake_error`), so the caller can
say what went wrong: certificate not signed by our CA, wrong host name, client certificate refused.
Make one context per association: the record is the last handshake's.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from grok_pacs.config import Settings


class _RecordingSSLSocket(ssl.SSLSocket):
    """An SSLSocket that leaves a TLS failure on its context before raising it.

    In TLS 1.3 the server judges our client certificate after our side of the handshake is done: its
    refusal arrives as an alert on the first read, so reads record too.
    """

    def connect(self, address) -> None:  # type: ignore[no-untyped-def]
        try:
            super().connect(address)
        except (ssl.SSLError, ConnectionResetError) as exc:  # a peer that drops our certificate resets
            _record(self.context, exc)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:
            _record(self.context, exc)
            raise

    def recv_into(self, buffer, nbytes: int | None = None, flags: int = 0) -> int:  # type: ignore[no-untyped-def]
        try:
            return super().recv_into(buffer, nbytes, flags)
        except ssl.SSLError as exc:
            _record(self.context, exc)
            raise


def _record(context: ssl.SSLContext, exc: BaseException) -> None:
    context.handshake_error = exc  # type: ignore[attr-defined]


def client_context(
    ca: Path, certificate: Path | None = None, key: Path | None = None, verify_hostname: bool = True
) -> ssl.SSLContext:
    """A TLS 1.2+ client context trusting only `ca`, presenting `certificate`/`key` when given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = verify_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if certificate is not None:
        context.load_cert_chain(str(certificate), str(key) if key is not None else None)
    context.sslsocket_class = _RecordingSSLSocket
    _record(context, None)  # type: ignore[arg-type]
    return context


def delivery_context(settings: Settings) -> ssl.SSLContext | None:
    """The context for delivering results to `destination`, or None when delivery TLS is off."""
    if settings.destination_tls_ca is None:
        return None
    return client_context(
        settings.destination_tls_ca,
        settings.destination_tls_certificate,
        settings.destination_tls_key,
        settings.destination_tls_verify_hostname,
    )


def handshake_error(context: ssl.SSLContext | None) -> str:
    """Why the last handshake on `context` failed, in words; '' when it did not (or no TLS)."""
    exc = getattr(context, "handshake_error", None)
    if exc is None:
        return ""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the peer's certificate was not accepted: {exc.verify_message}"
    reason = str(getattr(exc, "reason", "") or exc)
    if "CERTIFICATE_REQUIRED" in reason:
        return f"the peer requires a client certificate ({reason}): set destination_tls_certificate and _key"
    if any(alert in reason for alert in ("BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN")):
        return f"the peer refused our client certificate ({reason})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {reason}"
    return f"TLS handshake failed: the peer closed the connection ({exc}); does it require a client certificate?"
