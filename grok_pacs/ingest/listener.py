"""The C-STORE listener: a pynetdicom AE that durably stores ophthalmic instances and indexes them.

The handler is thin: pynetdicom streams each received dataset straight into a temporary file in
`<data>/tmp/` (`STORE_RECV_CHUNKED_DATASET`, redirected here from the system temp directory), the
handler checks the UIDs and that the file is whole (header only, no pixel decoding), fdatasyncs it,
renames it to `<data>/incoming/<study>/<series>/<sop>.dcm`, commits the index row (together with the
rows of other associations, `store.group_commit`), and only then answers Success (a refusal answers a
failure status with the reason as ErrorComment). It never calls out over the network; assembly (another
thread) queues the jobs. The pynetdicom receive set-up (streaming, TLS) is in `grok_pacs.ingest.transport`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import evt

from grok_pacs.config import Settings
from grok_pacs.dicom import fastpath
from grok_pacs.dicom.contexts import scp_contexts
from grok_pacs.dicom.header import DatasetLimitError, IncompleteDatasetError, read_header
from grok_pacs.dicom.header import Limits as HeaderLimits
from grok_pacs.dicom.status import DimseStatus, status_name
from grok_pacs.dicom.uids import InvalidUIDError, instance_relpath, is_valid_uid
from grok_pacs.ingest.connections import GuardedServer
from grok_pacs.ingest.guard import Guard, GuardedRequestHandler, Limits, ListenerAE
from grok_pacs.ingest.transport import (
    enable_streaming_receive,
    receive_error,
    receive_into,
    ssl_context,
)
from grok_pacs.ops import audit, metrics, phi
from grok_pacs.store import db
from grok_pacs.store.files import atomic_copy, free_bytes, place_file, start_directory_fsync, start_fsync, tmp_dir
from grok_pacs.store.group_commit import GroupCommit, row_index
from grok_pacs.store.index import InstanceRecord, StudyIndex

log = logging.getLogger("grok_pacs.ingest.listener")
MB = 1024 * 1024
ERROR_COMMENT_MAX = 64  # LO


@dataclass
class _AssociationStats:
    calling_ae: str
    called_ae: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    bytes: int = 0
    outcome: str = "closed"
    studies: dict[str, Counter[str]] = field(default_factory=dict)  # study -> SOP class -> stored (audit trail)


def _peer_host(peer: str) -> str:
    """The address of a `host:port` peer string."""
    return peer.rpartition(":")[0] or peer


class StoreRefused(Exception):
    """A C-STORE request answered with a failure status; `status` is the code to return."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def failure_response(code: int, reason: str) -> Dataset:
    """A C-STORE failure status with the log line's reason as ErrorComment (0000,0902), so that the
    sending PACS can show why. ErrorComment is LO: at most 64 printable ASCII characters, no backslash
    (the value delimiter)."""
    text = "".join(ch if " " <= ch <= "~" and ch != "\\" else "?" for ch in reason.strip())
    response = Dataset()
    response.Status = int(code)
    response.ErrorComment = text if len(text) <= ERROR_COMMENT_MAX else text[: ERROR_COMMENT_MAX - 3] + "..."
    return response


def _check_received(request) -> None:
    """Refuse a C-STORE whose dataset could not be written while it arrived (a full disk): its partial
    file is already gone (`transport.ReceiveFile`), the association goes on."""
    error = receive_error(request)
    if error is not None:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise StoreRefused(DimseStatus.REFUSED_OUT_OF_RESOURCES, f"cannot write the dataset: {reason}")


class Listener:
    """The DICOM storage SCP. `start()` serves in background threads; `stop()` shuts it down."""

    def __init__(
        self, settings: Settings, index: StudyIndex, on_stored: Callable[[InstanceRecord], None] | None = None
    ) -> None:
        self.settings = settings
        self.index = index
        self._rows = row_index(index)  # the rows' commits skip the WAL fsync: see store.group_commit
        self.commits = GroupCommit(self._rows, start_directory_fsync)
        self.on_stored = on_stored
        self.data_dir = Path(settings.data_dir).resolve()
        self.tmp_dir = tmp_dir(self.data_dir)
        self._stats: dict[int, _AssociationStats] = {}
        self._lock = threading.Lock()
        self._server = None
        self.ae = self._build_ae()

    def _build_ae(self) -> ListenerAE:
        s = self.settings
        ae = ListenerAE(ae_title=s.ae_title)
        ae.supported_contexts = scp_contexts(s.accepted_sop_classes)
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.max_pdu
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        ae.require_called_aet = True
        ae.require_calling_aet = list(s.allowed_aes)
        receive_into(ae, self.tmp_dir)
        return ae

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("listener is not started")
        return self._server.server_address[1]

    def start(self) -> None:
        """Bind and serve in background threads (returns at once)."""
        enable_streaming_receive()
        if self.settings.pynetdicom_fast_path:
            fastpath.install()
        else:
            fastpath.uninstall()  # process-wide: pynetdicom exactly as released
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
        address = (self.settings.bind_address, self.settings.port)
        self.ae.guard = self._guard()
        self._server = self.ae.make_server(
            address,
            evt_handlers=handlers,
            ssl_context=ssl_context(self.settings),
            server_class=GuardedServer,
            request_handler=GuardedRequestHandler,
        )
        self.ae._servers.append(self._server)  # as AE.start_server does; server.shutdown() removes it
        thread = threading.Thread(target=self._server.serve_forever, name="grok-listener", daemon=True)
        thread.start()
        log.info(
            "listening: ae=%s address=%s:%d tls=%s sop_classes=%d allowed_aes=%s",
            self.settings.ae_title,
            address[0],
            self.port,
            self.settings.tls_enabled,
            len(self.settings.accepted_sop_classes),
            ",".join(self.settings.allowed_aes) or "any",
        )

    def _guard(self) -> Guard:
        s = self.settings
        limits = Limits(
            max_pdu=s.max_pdu,
            pdu_timeout=s.network_timeout,
            pending_timeout=s.acse_timeout,
            max_pending=s.max_pending_connections,
        )
        return Guard(limits, self._admission)

    def _admission(self, established: int) -> str | None:
        """Why a new association must be refused now (before any transfer), or None. A reserve of 0 leaves
        only the per-instance watermark (`_check_disk`)."""
        s = self.settings
        if not s.transfer_reserve_mb:
            return None
        needed = (s.min_free_disk_mb + (established + 1) * s.transfer_reserve_mb) * MB
        free = free_bytes(self.data_dir)
        if free < needed:
            return f"free disk {free // MB} MB below the reserve of {needed // MB} MB"
        return None

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting; let open associations finish for up to `grace` seconds, then abort them.

        An aborted transfer was never acknowledged: the sender retries it, recovery removes its file.
        """
        if self._server is not None:
            self._stop_serving(grace)
        if self._rows is not self.index:
            self._rows.close()
            self._rows.engine.dispose()

    def _stop_serving(self, grace: float) -> None:
        self._server.shutdown()
        self._server = None
        deadline = time.monotonic() + grace
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self.ae.active_associations:
            log.warning("aborting association from %s at shutdown", assoc.requestor.ae_title)
            assoc.abort()

    # --- association bookkeeping (one log line per association) -----------------------------------
    def _stats_for(self, event) -> _AssociationStats:
        assoc = event.assoc
        with self._lock:
            stats = self._stats.get(id(assoc))
            if stats is None:
                request = assoc.requestor.primitive
                called = request.called_ae_title if request is not None else assoc.acceptor.ae_title
                stats = _AssociationStats(
                    calling_ae=str(assoc.requestor.ae_title or "").strip(),
                    called_ae=str(called or "").strip(),
                    peer=f"{assoc.requestor.address}:{assoc.requestor.port}",
                )
                self._stats[id(assoc)] = stats
            return stats

    def _on_accepted(self, event) -> None:
        self._stats_for(event).outcome = "released"
        metrics.association_accepted()

    def _on_rejected(self, event) -> None:
        metrics.association_rejected()
        stats = self._stats_for(event)
        refusal = getattr(event.assoc, "grok_refusal", None)
        if refusal:
            stats.outcome = f"rejected ({refusal})"
        elif self.settings.allowed_aes and stats.calling_ae not in self.settings.allowed_aes:
            stats.outcome = "rejected (calling AE not allowed)"
            audit.security_alert(stats.calling_ae, _peer_host(stats.peer), "calling AE title not allowed")
        elif stats.called_ae != self.settings.ae_title:
            stats.outcome = "rejected (called AE is not ours)"
            audit.security_alert(stats.calling_ae, _peer_host(stats.peer), "called AE title is not ours")
        else:
            stats.outcome = "rejected (association limit or negotiation)"

    def _on_aborted(self, event) -> None:
        refusal = getattr(event.assoc.dul.socket, "refusal", "")
        self._stats_for(event).outcome = f"aborted ({refusal})" if refusal else "aborted"

    def _on_released(self, event) -> None:
        self._stats_for(event).outcome = "released"

    def _on_close(self, event) -> None:
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return  # connection closed before any association (e.g. a failed TLS handshake)
        log.info(
            "association %s: calling=%s called=%s peer=%s stored=%d duplicates=%d failed=%d bytes=%d seconds=%.2f",
            stats.outcome,
            stats.calling_ae,
            stats.called_ae,
            stats.peer,
            stats.stored,
            stats.duplicates,
            stats.failed,
            stats.bytes,
            time.monotonic() - stats.started,
        )
        for study_uid, sop_classes in stats.studies.items():  # one audit message per study received
            audit.instances_received(study_uid, stats.calling_ae, _peer_host(stats.peer), sop_classes)

    def _on_echo(self, event) -> int:
        return DimseStatus.SUCCESS

    # --- C-STORE ------------------------------------------------------------------------------------
    def _on_store(self, event) -> int | Dataset:
        stats = self._stats_for(event)
        request = event.request
        try:
            _check_received(request)
            code = self._store(Path(event.dataset_path), request, event.context, stats.calling_ae, stats)
        except StoreRefused as refusal:
            stats.failed += 1
            metrics.instance_failed(status_name(refusal.code))
            log.warning(
                "refused instance from %s: status=%s (0x%04X): %s",
                stats.calling_ae,
                status_name(refusal.code),
                refusal.code,
                refusal,
            )
            return failure_response(refusal.code, str(refusal))
        return code

    def _store(self, received: Path, request, context, calling_ae: str, stats: _AssociationStats) -> int:
        sop_uid = str(request.AffectedSOPInstanceUID or "")
        if not is_valid_uid(sop_uid):
            raise StoreRefused(DimseStatus.ERROR_INVALID_UID, f"AffectedSOPInstanceUID {sop_uid[:80]!r} is invalid")
        self._check_sop_class(str(request.AffectedSOPClassUID or ""), str(context.abstract_syntax))
        self._check_disk(received)
        synced = start_fsync(received)  # runs on the disk while the header is checked here
        limits = HeaderLimits(self.settings.max_inflated_mb, self.settings.max_sequence_depth)
        try:
            header = read_header(received, limits)
        except InvalidUIDError as exc:
            raise StoreRefused(DimseStatus.ERROR_INVALID_UID, str(exc)) from exc
        except DatasetLimitError as exc:
            raise StoreRefused(DimseStatus.ERROR_DATASET_LIMIT, str(exc)) from exc
        except IncompleteDatasetError as exc:
            raise StoreRefused(DimseStatus.ERROR_INCOMPLETE_DATASET, str(exc)) from exc
        if header.sop_uid != sop_uid:
            raise StoreRefused(DimseStatus.ERROR_UID_MISMATCH, "dataset SOPInstanceUID differs from the request's")
        if header.sop_class_uid != str(request.AffectedSOPClassUID):
            raise StoreRefused(
                DimseStatus.ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS, "dataset SOPClassUID differs from the request's"
            )
        relpath = instance_relpath(header.study_uid, header.series_uid, header.sop_uid)
        dest = self.data_dir / relpath
        if dest.is_file() and self.index.has_instance(sop_uid):  # the file first: no index lock when new
            stats.duplicates += 1
            metrics.instance_duplicate()
            return DimseStatus.SUCCESS  # idempotent: the first copy is already durable
        record = InstanceRecord.from_header(
            header,
            size=received.stat().st_size,
            path=relpath.as_posix(),
            received_at=time.time(),
            calling_ae=calling_ae,
        )
        if not self._persist(received, dest, record, synced):
            stats.duplicates += 1
            metrics.instance_duplicate()
            return DimseStatus.SUCCESS
        stats.stored += 1
        stats.studies.setdefault(record.study_uid, Counter())[record.sop_class_uid] += 1
        stats.bytes += record.size
        metrics.instance_received(record.sop_class_uid, record.size)
        if self.on_stored is not None:
            self.on_stored(record)
        return DimseStatus.SUCCESS

    def _check_sop_class(self, sop_class: str, abstract_syntax: str) -> None:
        """The request's SOP class must be the one negotiated for its presentation context, and allowed: the
        context decides which classes reach here, the request alone does not (PS3.7 0x0122 otherwise)."""
        if sop_class != abstract_syntax:
            raise StoreRefused(
                DimseStatus.SOP_CLASS_NOT_SUPPORTED,
                f"SOP class {sop_class[:64]!r} is not its context's ({abstract_syntax})",
            )
        if sop_class not in self.settings.accepted_sop_classes:
            raise StoreRefused(DimseStatus.SOP_CLASS_NOT_SUPPORTED, f"SOP class {sop_class!r} is not accepted")

    def _check_disk(self, received: Path) -> None:
        needed = self.settings.min_free_disk_mb * MB + received.stat().st_size
        if free_bytes(self.data_dir) < needed:
            raise StoreRefused(
                DimseStatus.REFUSED_OUT_OF_RESOURCES,
                f"free disk below min_free_disk_mb={self.settings.min_free_disk_mb}",
            )

    def _persist(self, received: Path, dest: Path, record: InstanceRecord, synced: Future) -> bool:
        """File and index row, both durable; False if the row existed. The file's data is durable before
        it is renamed into place; the rename's directory fsync and the index commit are shared with the
        other associations' instances waiting at the same moment (`store.group_commit`)."""
        try:
            if received.parent != self.tmp_dir:  # not streamed into our tmp dir (should not happen)
                atomic_copy(self.data_dir, received, dest)
                return self.index.add_instance(record)
            return self.commits.commit(record, place_file(received, dest, synced))
        except db.DatabaseError as exc:  # unreachable, locked, failed: no durable record, no Success
            # the exception's type only: a driver's message may quote the statement and, unless hidden, its values
            log.error("index write failed for %s: %s", record.path, phi.describe(exc))
            raise StoreRefused(DimseStatus.PROCESSING_FAILURE, f"index write failed: {phi.describe(exc)}") from exc
        except OSError as exc:
            raise StoreRefused(
                DimseStatus.REFUSED_OUT_OF_RESOURCES, f"cannot store {dest.name}: {phi.describe(exc)}"
            ) from exc
