"""How the Celery side is wired: no signal handler or settings at import, resources through the app."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from grok_pacs.config import load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_job_modules_connects_no_signal_and_reads_no_settings(tmp_path: Path) -> None:
    probe = (
        "import grok_pacs.jobs.app, grok_pacs.jobs.publisher, grok_pacs.jobs.worker, grok_pacs.jobs.tasks, "
        "grok_pacs.jobs.serve\nfrom celery.signals import worker_ready\nprint(len(worker_ready.receivers))"
    )
    # An invalid setting in the environment: any import that built Settings would fail loudly.
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "GROK_PACS_PORT": "not-a-port", "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"


def test_a_task_on_an_app_without_a_worker_context_fails_naming_the_fix(tmp_path: Path) -> None:
    import grok_pacs.jobs.tasks  # noqa: F401 - registers the shared tasks (a worker imports TASK_MODULES)
    from grok_pacs.jobs.app import TASK_ANALYZE_STUDY, TASK_MODULES, create_app
    from grok_pacs.jobs.worker import context_of, worker_app

    bare = create_app(load_settings(data_dir=tmp_path / "bare"), include=TASK_MODULES)
    with pytest.raises(RuntimeError, match="worker_app"):
        _ = bare.tasks[TASK_ANALYZE_STUDY].ctx
    bare.close()
    app = worker_app(load_settings(data_dir=tmp_path / "data"))
    try:
        task = app.tasks[TASK_ANALYZE_STUDY]
        assert task.ctx is context_of(app) and task.ctx.settings.data_dir == tmp_path / "data"
    finally:
        app.close()
