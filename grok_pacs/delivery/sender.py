"""Delivering SRs from the outbox to the destination PACS by C-STORE, and the study state that follows.

`deliver()` claims the outbox row (so two workers never send the same SR at once), sends the SR file kept
under `<data>/sr/` (or its object in the store: grok_pacs.delivery.results), and records the outcome:
DELIVERED; back to PENDING on a transient failure (the caller retries with backoff); FAILED on a
permanent one (no retry). A DELIVERED row is never sent again.
The one window left — the PACS stored the SR but the worker died before recording it — ends in a resend
of the same SOP Instance UID, which a PACS files as the same instance (Orthanc keeps one copy).
"""

from __future__ import annotations

import io
import logging
import time
from enum import StrEnum
from pathlib import Path, PurePosixPath

import pydicom
from pydicom.dataset import Dataset

from grok_pacs.config import Settings
from grok_pacs.delivery import results
from grok_pacs.dicom import tls
from grok_pacs.dicom.scu import PermanentStoreError, TransientStoreError, store_dataset
from grok_pacs.dicom.uids import require_uid, resolve_inside
from grok_pacs.ops import audit, metrics
from grok_pacs.ops.phi import describe
from grok_pacs.store.blobs import BlobError, BlobStore, BlobStoreUnavailable
from grok_pacs.store.files import atomic_write_bytes
from grok_pacs.store.index import StudyIndex, StudyState
from grok_pacs.store.outbox import Outbox, OutboxEntry, OutboxState, ResultKind

log = logging.getLogger("grok_pacs.delivery.sender")

SR_DIR = "sr"
LEASE_MARGIN_S = 60.0


class DeliveryOutcome(StrEnum):
    DELIVERED = "delivered"  # stored by the destination now
    ALREADY_DELIVERED = "already-delivered"  # an earlier attempt succeeded: nothing sent
    BUSY = "busy"  # another worker holds the claim right now
    GAVE_UP = "gave-up"  # the row is FAILED: nothing sent
    NO_DESTINATION = "no-destination"  # no PACS configured: the SR stays in the outbox and under sr/


def sr_relpath(study_uid: str, sr_uid: str) -> PurePosixPath:
    """`sr/<study>/<sr uid>.dcm`, relative to the data directory (UIDs validated: they name files)."""
    return PurePosixPath(SR_DIR, require_uid(study_uid, "StudyInstanceUID"), f"{require_uid(sr_uid, 'SR UID')}.dcm")


def write_result(data_dir: Path, result: Dataset) -> PurePosixPath:
    """Write a result (an SR, or the study's encapsulated PDF) durably under `<data>/sr/` (replacing an
    earlier copy of the same UID)."""
    relpath = sr_relpath(str(result.StudyInstanceUID), str(result.SOPInstanceUID))
    buffer = io.BytesIO()
    result.save_as(buffer, enforce_file_format=True)
    atomic_write_bytes(Path(data_dir), resolve_inside(Path(data_dir), relpath), buffer.getvalue())
    return relpath


def claim_lease_s(settings: Settings) -> float:
    """How long a SENDING claim is honoured: longer than one C-STORE can take, then it is stale."""
    return settings.acse_timeout + 2 * settings.dimse_timeout + LEASE_MARGIN_S


def retry_delay_s(settings: Settings, retries_done: int) -> float:
    """Exponential backoff: delivery_backoff_s, doubled per retry, capped at delivery_backoff_max_s."""
    return min(settings.delivery_backoff_s * (2 ** max(retries_done, 0)), settings.delivery_backoff_max_s)


def _skip_outcome(entry: OutboxEntry) -> DeliveryOutcome:
    if entry.state is OutboxState.DELIVERED:
        return DeliveryOutcome.ALREADY_DELIVERED
    if entry.state is OutboxState.FAILED:
        return DeliveryOutcome.GAVE_UP
    return DeliveryOutcome.BUSY


def _count_failure(entry: OutboxEntry, *, permanent: bool) -> None:
    if entry.kind is ResultKind.SR:
        metrics.sr_delivery_failed(permanent=permanent)


def deliver(
    settings: Settings, outbox: Outbox, sr_uid: str, *, owner: str, store: BlobStore | None = None
) -> DeliveryOutcome:
    """Send one result (SR or PDF report) of the outbox once. Raises TransientStoreError (row PENDING
    again, retry later; also an object store that is down) or PermanentStoreError (row FAILED, do not
    retry); both name the destination and the reason. `store`: where results with a key are kept."""
    if settings.destination is None:
        return DeliveryOutcome.NO_DESTINATION
    entry = outbox.claim(sr_uid, owner, lease_s=claim_lease_s(settings))
    if entry is None:
        current = outbox.get(sr_uid)
        assert current is not None  # claim() raised if the row did not exist
        return _skip_outcome(current)
    destination = str(settings.destination)
    try:
        sr = results.read(Path(settings.data_dir), store, entry.path)
    except BlobStoreUnavailable as exc:
        outbox.release(sr_uid, owner, f"transient: {describe(exc)}")
        _count_failure(entry, permanent=False)
        raise TransientStoreError(f"{_name(entry)} {entry.path} not fetched: {describe(exc)}") from exc
    except (OSError, pydicom.errors.InvalidDicomError, BlobError) as exc:
        outbox.mark_failed(sr_uid, owner, f"{_name(entry)} file {entry.path} unreadable: {describe(exc)}")
        _count_failure(entry, permanent=True)
        raise PermanentStoreError(f"{_name(entry)} file {entry.path} unreadable: {describe(exc)}") from exc
    started = time.perf_counter()
    try:
        result = store_dataset(
            settings.destination,
            sr,
            calling_ae=settings.ae_title,
            timeout=settings.dimse_timeout,
            tls=tls.delivery_context(settings),  # fresh per association: it records that handshake's failure
        )
    except TransientStoreError as exc:
        outbox.release(sr_uid, owner, f"transient: {describe(exc)}")
        _count_failure(entry, permanent=False)
        log.warning(
            "delivery of %s %s to %s failed (transient, attempt %d): %s",
            _name(entry),
            sr_uid,
            destination,
            entry.attempts,
            exc,
        )
        raise
    except PermanentStoreError as exc:
        outbox.mark_failed(sr_uid, owner, f"rejected by {destination}: {describe(exc)}")
        _count_failure(entry, permanent=True)
        log.error("delivery of %s %s to %s failed permanently: %s", _name(entry), sr_uid, destination, exc)
        raise
    outbox.mark_delivered(sr_uid, owner, destination)
    peer = settings.destination
    audit.instances_delivered(entry.study_uid, str(sr.SOPClassUID), peer.ae_title, peer.host)
    if entry.kind is ResultKind.SR:  # the SR metrics count SRs; the PDF shows in the outbox and the log
        metrics.sr_delivered()
        metrics.observe_stage("delivery", time.perf_counter() - started)
    log.info(
        "delivered %s %s of study %s to %s (%s, attempt %d)",
        _name(entry),
        sr_uid,
        entry.study_uid,
        destination,
        result.status_name,
        entry.attempts,
    )
    return DeliveryOutcome.DELIVERED


def give_up(outbox: Outbox, sr_uid: str, owner: str, reason: str) -> None:
    """Retries exhausted: the row becomes FAILED with the last reason (claims it first if it must)."""
    entry = outbox.get(sr_uid)
    if entry is None or entry.state in (OutboxState.DELIVERED, OutboxState.FAILED):
        return
    if entry.state is not OutboxState.SENDING or entry.claimed_by != owner:
        if outbox.claim(sr_uid, owner, lease_s=float("inf")) is None:
            return
    outbox.mark_failed(sr_uid, owner, reason)
    _count_failure(entry, permanent=True)  # retries exhausted: the result is given up


_NAMES = {ResultKind.PDF: "PDF report", ResultKind.KOS: "rejection note", ResultKind.VSR: "verified SR"}


def _name(entry: OutboxEntry) -> str:
    return f"SR {entry.eye}" if entry.kind is ResultKind.SR else _NAMES[entry.kind]


def study_summary(entries: list[OutboxEntry], destination: str) -> tuple[StudyState, str]:
    """The study state its results (SRs, PDF report) imply, with the reason shown by `grok-pacs studies`."""
    notes = list(dict.fromkeys(e.note for e in entries if e.note))
    failed = [e for e in entries if e.state is OutboxState.FAILED]
    if failed:
        reasons = "; ".join(f"{_name(e)} {e.last_error}" for e in failed)
        return StudyState.FAILED, f"delivery failed: {reasons}"
    waiting = [e for e in entries if e.state is not OutboxState.DELIVERED]
    if waiting:
        errors = "; ".join(f"{_name(e)}: {e.last_error}" for e in waiting if e.last_error)
        if not destination:
            return StudyState.DONE, "no destination configured: results kept under sr/ and in the outbox"
        return StudyState.DELIVERING, f"{len(waiting)} result(s) waiting for {destination}" + (
            f" ({errors})" if errors else ""
        )
    srs = [e for e in entries if e.kind is ResultKind.SR]
    pdf = " and the PDF report" if any(e.kind is ResultKind.PDF for e in entries) else ""
    notes_sent = sum(e.kind is ResultKind.KOS for e in entries)
    withdrawn = f", {notes_sent} rejection note(s)" if notes_sent else ""
    detail = (
        f"{len(srs)} SR(s){pdf}{withdrawn} delivered to {destination or entries[0].destination} "
        f"(eyes {','.join(e.eye for e in srs)})"
    )
    return StudyState.DONE, detail + (f"; {'; '.join(notes)}" if notes else "")


def update_study_state(
    settings: Settings, index: StudyIndex, outbox: Outbox, study_uid: str, version: int
) -> StudyState | None:
    """Set the study's state from its SRs of `version` (no change if the study moved to a newer one)."""
    entries = outbox.for_study(study_uid, version)
    if not entries:
        return None
    state, detail = study_summary(entries, str(settings.destination or ""))
    index.set_state(study_uid, state, detail, version=version)
    return state
