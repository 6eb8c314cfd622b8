"""The `grok-pacs` CLI as an administrator uses it: help, echo, send, studies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from devtools.ports import free_port
from devtools.sample_dicom import demo_study
from grok_pacs.store.index import StudyState
from tests.helpers.ingest_support import AE, ingest_settings, running, wait_until

ROOT = Path(__file__).resolve().parents[2]


def grok(*args: str, data_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "GROK_PACS_DATA_DIR": str(data_dir)} if data_dir else dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "grok_pacs.cli", *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )


def test_every_command_explains_itself() -> None:
    top = grok("--help")
    assert top.returncode == 0
    for command, words in {
        "listen": ["C-STORE", "quiet_period"],
        "echo": ["C-ECHO", "AE@HOST:PORT"],
        "send": ["--to", "recursively"],
        "studies": ["--json", "QUEUED"],
        "db": ["upgrade", "current", "advisory"],
    }.items():
        assert command in top.stdout
        done = grok(command, "--help")
        assert done.returncode == 0 and all(word in done.stdout for word in words), done.stdout


def test_echo_send_and_studies(tmp_path: Path) -> None:
    settings = ingest_settings(tmp_path)
    study = generate_uid()
    files = demo_study(tmp_path / "study", study)
    peer = f"{AE}@127.0.0.1:{settings.port}"
    with running(settings) as service:
        assert grok("echo", peer).returncode == 0
        sent = grok("send", str(tmp_path / "study"), "--to", peer, "--calling-ae", "ADMIN")
        assert sent.returncode == 0, sent.stderr
        assert f"{len(files)} of {len(files)} stored" in sent.stdout
        (tmp_path / "study" / "notes.txt").write_text("not DICOM")
        mixed = grok("send", str(tmp_path / "study"), "--to", peer)
        assert (
            mixed.returncode == 1
            and "NOT_DICOM" in mixed.stdout
            and f"{len(files)} of {len(files) + 1} stored" in mixed.stdout
        )
        ct = grok("send", get_testdata_file("CT_small.dcm"), "--to", peer)
        assert ct.returncode == 1 and "SOP_CLASS_NOT_SUPPORTED" in ct.stdout
        wait_until(lambda: service.index.study(study).state is StudyState.QUEUED, 10, "the study to be queued")
    listing = grok("studies", "--json", data_dir=settings.data_dir)
    assert listing.returncode == 0
    [row] = json.loads(listing.stdout)
    assert (row["study_uid"], row["state"], row["version"], row["instance_count"]) == (study, "QUEUED", 1, 4)
    table = grok("studies", data_dir=settings.data_dir)
    assert study in table.stdout and "QUEUED" in table.stdout
    dead = grok("echo", f"{AE}@127.0.0.1:{free_port()}", "--timeout", "3")
    assert dead.returncode == 1 and "FAILED" in dead.stderr
