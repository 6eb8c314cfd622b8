"""Celery tasks of the worker: analyse a study, deliver an SR. Arguments are keyword-only UIDs (JSON).

`analyze_study(study_uid=, version=)` runs the study job (grok_pacs.jobs.study_job) into the outbox and tries
each SR's delivery at once (lowest latency). A transient delivery failure schedules `deliver_sr(sr_uid=)` with
exponential backoff, at most `delivery_max_retries` times, then the SR is FAILED; a permanent failure is
FAILED at once. Both tasks retry transient errors (the database, the broker or the object store down: bounded
exponential backoff over minutes, grok_pacs.jobs.retry); any other analysis error fails the study with its
reason and is not retried. Both tasks are idempotent, so the reaper (grok_pacs.ingest.reaper) may publish a
job again whose message was lost or whose retries ran out.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from celery import shared_task

from grok_pacs.delivery import sender as delivery
from grok_pacs.dicom.scu import PermanentStoreError, TransientStoreError
from grok_pacs.jobs import fetch, study_job
from grok_pacs.jobs.app import TASK_ANALYZE_STUDY, TASK_DELIVER_SR
from grok_pacs.jobs.retry import TRANSIENT_ERRORS, retry_transient
from grok_pacs.jobs.snapshot import StudyNotYetQueuedError, StudyOutcome, StudySnapshot, read_study
from grok_pacs.jobs.worker import ContextTask, WorkerContext
from grok_pacs.ops import metrics
from grok_pacs.ops.phi import describe
from grok_pacs.store.index import StudyState
from grok_pacs.store.outbox import OutboxState, ResultKind

log = logging.getLogger("grok_pacs.jobs.tasks")

NOT_YET_QUEUED_DELAY_S = 0.5  # assembly records the version right after publishing: this is ample
NOT_YET_QUEUED_RETRIES = 20


def _schedule_retry(task: ContextTask, sr_uid: str, retry_number: int, reason: str) -> None:
    """Queue retry `retry_number` (1-based) of a delivery, or give the SR up when none are left."""
    ctx = task.ctx
    settings = ctx.settings
    if retry_number > settings.delivery_max_retries:
        delivery.give_up(
            ctx.outbox, sr_uid, f"gave-up-{sr_uid}", f"gave up after {retry_number} attempts; last: {reason}"
        )
        return
    countdown = delivery.retry_delay_s(settings, retry_number - 1)
    task.app.send_task(
        TASK_DELIVER_SR,
        kwargs={"sr_uid": sr_uid, "retry_number": retry_number},
        countdown=countdown,
        queue=settings.queue,
    )
    log.info("SR %s: delivery retry %d/%d in %.1f s", sr_uid, retry_number, settings.delivery_max_retries, countdown)


def _deliver_once(ctx: WorkerContext, sr_uid: str, owner: str) -> tuple[str, str]:
    """One delivery attempt, recorded in the outbox. Returns the outcome's name ("transient" when the SR
    is PENDING again and a retry is due, "failed" when it is FAILED) and the reason of a failure."""
    try:
        return delivery.deliver(ctx.settings, ctx.outbox, sr_uid, owner=owner, store=ctx.blobs).value, ""
    except TransientStoreError as exc:
        return "transient", f"transient: {describe(exc)}"
    except PermanentStoreError as exc:
        return "failed", describe(exc)


def _fail_study(ctx: WorkerContext, study_uid: str, version: int, exc: BaseException) -> dict[str, Any]:
    reason = f"analysis failed: {describe(exc)}"  # a library's message may quote a patient attribute
    ctx.index.set_state(study_uid, StudyState.FAILED, reason[:2000], version=version)
    log.error("study %s v%d: %s", study_uid, version, reason, exc_info=exc)
    return {"study_uid": study_uid, "version": version, "outcome": "failed", "reason": reason}


def _instance_copies(ctx: WorkerContext, snapshot: StudySnapshot, owner: str) -> AbstractContextManager[StudySnapshot]:
    """The snapshot as the study job reads it: with an object store, on this job's verified copies."""
    if ctx.blobs is None or ctx.uploads is None:
        return nullcontext(snapshot)  # one box, or a shared data directory: the listener's files
    return fetch.local_copies(ctx.settings, ctx.uploads, ctx.blobs, snapshot, owner)


@shared_task(
    bind=True,
    base=ContextTask,
    name=TASK_ANALYZE_STUDY,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def analyze_study(self: ContextTask, *, study_uid: str, version: int) -> dict[str, Any]:
    """Analyse (study, version), put its SRs in the outbox and deliver them.

    The study is read from the index once (a snapshot handed down the study job); the index is written
    when analysis starts (ANALYSING) and once at the end (the state its SRs imply, or FAILED).
    """
    try:
        return _analyse_and_deliver(self, study_uid, version)
    except TRANSIENT_ERRORS as exc:
        retry_transient(self, self.ctx.settings, exc, f"study {study_uid} v{version}")


def _analyse_and_deliver(self: ContextTask, study_uid: str, version: int) -> dict[str, Any]:
    ctx = self.ctx
    owner = str(self.request.id or f"analyze-{study_uid}-v{version}")
    received_at: float | None = None  # the study's last instance, for the latency metrics
    try:
        snapshot = read_study(ctx.index, ctx.settings, study_uid, version)
        received_at = snapshot.last_received_at
        metrics.job_started(received_at, ctx.settings.quiet_period)
        with metrics.time_stage("analysis"), _instance_copies(ctx, snapshot, owner) as snapshot:
            result = study_job.run_study(
                ctx.settings,
                ctx.index,
                ctx.outbox,
                ctx.engine,
                ctx.bundle_version(),
                snapshot,
                owner=owner,
                store=ctx.blobs,
            )
    except TRANSIENT_ERRORS:
        raise  # retried by analyze_study, bounded, with backoff
    except StudyNotYetQueuedError as exc:
        if self.request.retries >= NOT_YET_QUEUED_RETRIES:
            log.warning("study %s v%d: %s; giving the job up", study_uid, version, exc)
            return {"study_uid": study_uid, "version": version, "outcome": "not-queued"}
        raise self.retry(exc=exc, countdown=NOT_YET_QUEUED_DELAY_S, max_retries=NOT_YET_QUEUED_RETRIES) from exc
    except Exception as exc:  # noqa: BLE001 - any other analysis error is permanent: record it, no retry
        metrics.job_done(received_at, succeeded=False)
        return _fail_study(ctx, study_uid, version, exc)
    summary: dict[str, Any] = {"study_uid": study_uid, "version": version, "outcome": result.outcome.value, "srs": {}}
    if result.outcome is StudyOutcome.ALREADY_DONE:  # a job published again: its end write may be the one missing
        delivery.update_study_state(ctx.settings, ctx.index, ctx.outbox, study_uid, version)
    if result.outcome is not StudyOutcome.ANALYSED:
        return summary
    for entry in result.entries:  # SRs under "srs" by UID; the study's PDF report under "pdf"
        if entry.state is OutboxState.DELIVERED:
            outcome, reason = delivery.DeliveryOutcome.ALREADY_DELIVERED.value, ""
        else:
            outcome, reason = _deliver_once(ctx, entry.sr_uid, owner)
        if entry.kind is ResultKind.PDF:
            summary["pdf"] = outcome
        elif entry.kind is ResultKind.KOS:  # the rejection note of the earlier version's results it replaces
            summary["rejection"] = outcome
        else:
            summary["srs"][entry.sr_uid] = outcome
        if outcome == "transient":
            _schedule_retry(self, entry.sr_uid, 1, reason)
    delivery.update_study_state(ctx.settings, ctx.index, ctx.outbox, study_uid, version)  # the end write
    metrics.job_done(received_at, succeeded=True)
    return summary


@shared_task(
    bind=True, base=ContextTask, name=TASK_DELIVER_SR, acks_late=True, reject_on_worker_lost=True, ignore_result=True
)
def deliver_sr(self: ContextTask, *, sr_uid: str, retry_number: int = 0) -> str:
    """Deliver one SR of the outbox: retry `retry_number` (0: a restart's recovery); idempotent per SR UID.
    A transient database or broker error retries this task (the same task id: it may claim its own row)."""
    try:
        return _deliver_and_record(self, sr_uid, retry_number)
    except TRANSIENT_ERRORS as exc:
        retry_transient(self, self.ctx.settings, exc, f"SR {sr_uid}")


def _deliver_and_record(self: ContextTask, sr_uid: str, retry_number: int) -> str:
    ctx = self.ctx
    owner = str(self.request.id or f"deliver-{sr_uid}")
    log.info("SR %s: delivery attempt (retry %d, task %s)", sr_uid, retry_number, owner)
    outcome, reason = _deliver_once(ctx, sr_uid, owner)
    if outcome == "transient":
        _schedule_retry(self, sr_uid, retry_number + 1, reason)  # may give the SR up: FAILED
    entry = ctx.outbox.get(sr_uid)
    if entry is not None:  # then the study's state follows its SRs (a given-up SR fails the study)
        delivery.update_study_state(ctx.settings, ctx.index, ctx.outbox, entry.study_uid, entry.study_version)
    return outcome
