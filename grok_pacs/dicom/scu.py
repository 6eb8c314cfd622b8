"""C-ECHO and C-STORE as a client: `grok-pacs echo`/`send`, the demo, and (later) SR delivery.

Failures are typed so a caller can decide whether to retry:
- `PermanentStoreError`: the same request will fail again (association rejected permanently, SOP class
  or transfer syntax not accepted, a failure status such as Cxxx/A9xx).
- `TransientStoreError`: try again later (connection refused or timed out, association aborted or
  rejected transiently, e.g. the peer's association limit, or an A7xx out-of-resources status).
Status codes are named in `grok_pacs.dicom.status.DimseStatus`.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, _config
from pynetdicom.association import Association

from grok_pacs.config import Peer
from grok_pacs.dicom.contexts import VERIFICATION, requested_contexts
from grok_pacs.dicom.status import DimseStatus, StatusCategory, category, status_name
from grok_pacs.dicom.tls import handshake_error

log = logging.getLogger("grok_pacs.dicom.scu")

REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02
NO_RESPONSE = -1  # pseudo-status: the association ended before the peer answered
NOT_DICOM = -2  # pseudo-status: the file was not sent, it has no readable DICOM file meta


class StoreError(RuntimeError):
    """A DICOM request that did not succeed; see the two subclasses."""


class PermanentStoreError(StoreError):
    """Retrying the same request will not help."""


class TransientStoreError(StoreError):
    """The peer or the network may accept the request later."""


class NoAcceptedContextError(PermanentStoreError):
    """The peer accepted none of the proposed SOP classes / transfer syntaxes ("not supported")."""


@dataclass(frozen=True)
class StoreResult:
    path: str  # the file sent ('' for an in-memory dataset)
    sop_class_uid: str
    sop_instance_uid: str
    status: int  # DIMSE status, or NO_RESPONSE / NOT_DICOM
    category: StatusCategory
    message: str = ""

    @property
    def ok(self) -> bool:
        """Stored by the peer (success or warning)."""
        return self.category in (StatusCategory.SUCCESS, StatusCategory.WARNING)

    @property
    def status_name(self) -> str:
        pseudo = {NO_RESPONSE: "NO_RESPONSE", NOT_DICOM: "NOT_DICOM"}
        return pseudo.get(self.status) or status_name(self.status)


def _make_ae(calling_ae: str, timeout: float, max_pdu: int) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.maximum_pdu_size = max_pdu
    return ae


@contextmanager
def _association(
    peer: Peer, calling_ae: str, contexts, timeout: float, max_pdu: int, tls: ssl.SSLContext | None
) -> Iterator[Association]:
    """An established association, released afterwards; raises a typed error when none comes up."""
    ae = _make_ae(calling_ae, timeout, max_pdu)
    ae.requested_contexts = contexts
    tls_args = (tls, peer.host) if tls is not None else None
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        tls_failure = handshake_error(tls)
        if tls_failure:  # pynetdicom only logs it; say it, not "cannot connect" (the PACS may fix its side)
            raise TransientStoreError(f"TLS connection to {peer} failed: {tls_failure}")
        raise _association_error(assoc, peer)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def _association_error(assoc: Association, peer: Peer) -> StoreError:
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        result = getattr(rsp, "result", None)
        reason = (
            f"{getattr(rsp, 'result_str', '?')}, {getattr(rsp, 'source_str', '?')}, {getattr(rsp, 'reason_str', '?')}"
        )
        if result == REJECTED_TRANSIENT:
            return TransientStoreError(f"association to {peer} rejected (transient): {reason}")
        return PermanentStoreError(f"association to {peer} rejected: {reason}")
    if assoc.is_aborted and assoc.rejected_contexts and not assoc.accepted_contexts:
        classes = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
        return NoAcceptedContextError(
            f"{peer} accepts none of the proposed contexts (SOP classes "
            f"{', '.join(classes)}): SOP class or transfer syntax not supported"
        )
    if assoc.is_aborted:
        return TransientStoreError(f"association to {peer} aborted (no acceptable context or peer abort)")
    return TransientStoreError(f"cannot connect to {peer} (refused, unreachable or timed out)")


def echo(peer: Peer, calling_ae: str, timeout: float = 30.0, tls: ssl.SSLContext | None = None) -> None:
    """C-ECHO `peer`; returns on Success, raises PermanentStoreError/TransientStoreError otherwise."""
    from pynetdicom.presentation import build_context

    with _association(peer, calling_ae, [build_context(VERIFICATION)], timeout, 0, tls) as assoc:
        response = assoc.send_c_echo()
        code = int(response.Status) if "Status" in response else NO_RESPONSE
    if code == NO_RESPONSE:
        raise TransientStoreError(f"no C-ECHO response from {peer}")
    if code != DimseStatus.SUCCESS:
        raise PermanentStoreError(f"C-ECHO to {peer} answered {status_name(code)} (0x{code:04X})")


def _file_keys(paths: Iterable[Path]) -> tuple[list[tuple[Path, str, str, str]], list[StoreResult]]:
    """(path, SOP class, SOP instance, transfer syntax) from each file's meta, and a NOT_DICOM result
    for each file that has no readable DICOM file meta (it is not sent)."""
    keys, unreadable = [], []
    for path in paths:
        try:
            meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
            keys.append(
                (
                    path,
                    str(meta.MediaStorageSOPClassUID),
                    str(meta.MediaStorageSOPInstanceUID),
                    str(meta.TransferSyntaxUID),
                )
            )
        except (InvalidDicomError, OSError, AttributeError) as exc:
            unreadable.append(
                StoreResult(
                    str(path), "", "", NOT_DICOM, StatusCategory.PERMANENT, f"not a DICOM file with file meta: {exc}"
                )
            )
    return keys, unreadable


def _result(path: str, sop_class: str, sop_uid: str, response: Dataset) -> StoreResult:
    if "Status" not in response:
        return StoreResult(
            path,
            sop_class,
            sop_uid,
            NO_RESPONSE,
            StatusCategory.TRANSIENT,
            "no response (association aborted or timed out)",
        )
    code = int(response.Status)
    comment = str(response.get("ErrorComment", "") or "")
    return StoreResult(path, sop_class, sop_uid, code, category(code), comment)


def store_files(
    peer: Peer,
    paths: Iterable[Path | str],
    calling_ae: str,
    timeout: float = 60.0,
    max_pdu: int = 0,
    tls: ssl.SSLContext | None = None,
) -> list[StoreResult]:
    """C-STORE DICOM files (sent as stored, without decoding), one association; a result per file.

    Raises PermanentStoreError/TransientStoreError only when no association comes up; per-file
    failures (including SOP classes the peer did not accept) are results.
    """
    keys, unreadable = _file_keys(Path(p) for p in paths)
    if not keys:
        return unreadable
    _config.STORE_SEND_CHUNKED_DATASET = True  # stream files as they are (process-wide, send-only switch)
    contexts = requested_contexts((sop_class, ts) for _, sop_class, _, ts in keys)
    try:
        return _store_keys(peer, keys, calling_ae, contexts, timeout, max_pdu, tls) + unreadable
    except NoAcceptedContextError as exc:
        return [
            StoreResult(
                str(path), sop_class, sop_uid, DimseStatus.SOP_CLASS_NOT_SUPPORTED, StatusCategory.PERMANENT, str(exc)
            )
            for path, sop_class, sop_uid, _ in keys
        ] + unreadable


def _store_keys(
    peer: Peer,
    keys: list[tuple[Path, str, str, str]],
    calling_ae: str,
    contexts,
    timeout: float,
    max_pdu: int,
    tls: ssl.SSLContext | None,
) -> list[StoreResult]:
    results: list[StoreResult] = []
    with _association(peer, calling_ae, contexts, timeout, max_pdu, tls) as assoc:
        for path, sop_class, sop_uid, _ in keys:
            if not assoc.is_established:
                results.append(
                    StoreResult(
                        str(path), sop_class, sop_uid, NO_RESPONSE, StatusCategory.TRANSIENT, "association ended"
                    )
                )
                continue
            try:
                response = assoc.send_c_store(path)
            except ValueError as exc:  # no accepted presentation context for this class/syntax
                results.append(
                    StoreResult(
                        str(path),
                        sop_class,
                        sop_uid,
                        DimseStatus.SOP_CLASS_NOT_SUPPORTED,
                        StatusCategory.PERMANENT,
                        str(exc),
                    )
                )
                continue
            results.append(_result(str(path), sop_class, sop_uid, response))
    return results


def store_dataset(
    peer: Peer, ds: Dataset, calling_ae: str, timeout: float = 60.0, max_pdu: int = 0, tls: ssl.SSLContext | None = None
) -> StoreResult:
    """C-STORE one in-memory dataset (e.g. an SR); returns the result when stored (success/warning).

    Raises PermanentStoreError or TransientStoreError for every other outcome.
    """
    syntax = (
        str(ds.file_meta.TransferSyntaxUID)
        if "TransferSyntaxUID" in getattr(ds, "file_meta", {})
        else "1.2.840.10008.1.2.1"
    )
    sop_class, sop_uid = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    contexts = requested_contexts([(sop_class, syntax)])
    with _association(peer, calling_ae, contexts, timeout, max_pdu, tls) as assoc:
        try:
            response = assoc.send_c_store(ds)
        except ValueError as exc:
            raise PermanentStoreError(f"{peer} does not accept SOP class {sop_class}: {exc}") from exc
        result = _result("", sop_class, sop_uid, response)
    if result.category is StatusCategory.TRANSIENT:
        raise TransientStoreError(f"{peer} answered {result.status_name}: {result.message}")
    if result.category is StatusCategory.PERMANENT:
        raise PermanentStoreError(f"{peer} answered {result.status_name} (0x{result.status:04X}): {result.message}")
    return result
