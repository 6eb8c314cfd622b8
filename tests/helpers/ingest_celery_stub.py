"""A Celery worker app for the ingest tests: grok-pacs' real app and broker settings, with a stand-in
`grok_pacs.tasks.analyze_study` that appends its kwargs to $GROK_TEST_JOB_LOG (the model comes later)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from grok_pacs.config import load_settings
from grok_pacs.jobs.app import TASK_ANALYZE_STUDY, create_app

app = create_app(load_settings())


@app.task(name=TASK_ANALYZE_STUDY)
def analyze_study(*, study_uid: str, version: int) -> None:
    with Path(os.environ["GROK_TEST_JOB_LOG"]).open("a") as log:
        log.write(json.dumps({"study_uid": study_uid, "version": version}) + "\n")
