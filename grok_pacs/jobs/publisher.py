"""Publishing analyse jobs to the Celery broker.

A job is the task `grok_pacs.tasks.analyze_study` with kwargs `{"study_uid": str, "version": int}` on
`settings.queue`. Its task id is deterministic (`analyze-<study>-v<version>`), so a job published twice
(a crash between publishing and recording it) is recognisable as the same job by the worker.
"""

from __future__ import annotations

import logging

from celery import Celery

from grok_pacs.config import Settings
from grok_pacs.jobs.app import TASK_ANALYZE_STUDY, TASK_DELIVER_SR, create_app

log = logging.getLogger("grok_pacs.jobs.publisher")

PUBLISH_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2.0}


def job_id(study_uid: str, version: int) -> str:
    return f"analyze-{study_uid}-v{version}"


class JobPublisher:
    """Puts analyse jobs on the broker; `publish` returns only after the broker accepted the message."""

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self.settings = settings
        self.app = app or create_app(settings)

    def publish(self, study_uid: str, version: int) -> str:
        """Send the job for (study, version); returns the task id. Raises on broker failure."""
        task_id = job_id(study_uid, version)
        self.app.send_task(
            TASK_ANALYZE_STUDY,
            kwargs={"study_uid": study_uid, "version": version},
            queue=self.settings.queue,
            task_id=task_id,
            retry=True,
            retry_policy=PUBLISH_RETRY_POLICY,
        )
        return task_id

    def publish_delivery(self, sr_uid: str, retry_number: int) -> None:
        """Send a delivery job for one outbox result (the reaper's, when its own job was lost)."""
        self.app.send_task(
            TASK_DELIVER_SR,
            kwargs={"sr_uid": sr_uid, "retry_number": retry_number},
            queue=self.settings.queue,
            retry=True,
            retry_policy=PUBLISH_RETRY_POLICY,
        )

    def close(self) -> None:
        self.app.close()
