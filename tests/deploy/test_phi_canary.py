"""No patient attribute in anything the service writes besides the DICOM it sends (issue 30, item 8).

One `grok-pacs serve` run (tiny bundle, DCMTK storescu in, DCMTK storescp as the PACS) receives a study
whose PatientName, PatientID, PatientBirthDate and AccessionNumber are canary strings, and a second study
whose values of those are invalid and oversized (a 200-character name, an ID with a backslash and
non-ASCII letters, the birth date "20XX13", a 27-character accession number). Then every output is searched
for every canary: the process's stdout/stderr, /metrics, /health, `grok-pacs studies --json`, every table
of the index and broker databases (study details, outbox notes and errors) and the audit trail. The SR and
PDF the PACS receives carry the patient module by design and are not searched.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import insert

from devtools.ports import free_port
from devtools.processes import GrokProcess, grok_env, wait_until
from devtools.storescp import StoreSCP
from grok_pacs.store import db
from tests.helpers.ingest_support import storescu
from tests.helpers.ophthalmic_dicom import Patient, make_cfp, write

LONG_NAME = ("ZQXLONGNAME" * 19)[:200]  # PN: at most 64 characters per component
CANARY = Patient(
    patient_id="ZQXPID0001", patient_name="ZQXCANARY^Nameone", birth_date="19230417", accession="ZQXACC0001"
)
HOSTILE = Patient(
    patient_id="ZQXBADID\\\u00dcmlaut\u00e9",  # LO: no backslash (the value delimiter); here a second value
    patient_name=LONG_NAME,
    birth_date="20XX13",
    accession="ZQXBADACC" * 3,  # SH: at most 16 characters
)
# What must never appear ("mlaut": the non-ASCII value in whatever escaping a leak would use).
CANARIES = ("ZQXCANARY", "Nameone", "ZQXPID0001", "19230417", "ZQXACC0001", "ZQXLONGNAME", "ZQXBADID", "mlaut")
CANARIES += ("20XX13", "ZQXBADACC")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _studies_json(env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "grok_pacs.cli", "studies", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done


def _database_text(data_dir: Path) -> str:
    """Every row of every table of every SQLite database the service keeps under its data directory."""
    texts = []
    for path in sorted(data_dir.rglob("*.sqlite")):
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                texts.extend(repr(row) for row in conn.execute(f'SELECT * FROM "{table}"'))
    assert texts, f"no database found under {data_dir}"
    return "\n".join(texts)


def _other_files_text(data_dir: Path) -> str:
    """Every other file the service wrote there, but the DICOM and PDF results (they carry the patient)."""
    texts = []
    for path in sorted(p for p in data_dir.rglob("*") if p.is_file() and ".sqlite" not in p.name):
        data = path.read_bytes()
        if data[128:132] != b"DICM" and not data.startswith(b"%PDF"):
            texts.append(f"{path}: {data.decode('utf-8', 'replace')} {data.decode('latin-1')}")
    return "\n".join(texts)


def _leaks(name: str, text: str) -> list[str]:
    return [f"{canary!r} in {name}" for canary in CANARIES if canary.lower() in text.lower()]


def test_no_patient_attribute_in_any_output_of_serve(tmp_path, tiny_bundle):
    pacs = StoreSCP(free_port(), tmp_path / "pacs").start()
    port, metrics_port = free_port(), free_port()
    data_dir, audit_log = tmp_path / "grok", tmp_path / "audit" / "audit.log"
    env = grok_env(
        data_dir=data_dir,
        bundle=tiny_bundle,
        port=port,
        bind_address="127.0.0.1",
        quiet_period=1,
        destination=f"PACS@127.0.0.1:{pacs.port}",
        metrics_port=metrics_port,
        audit_syslog=f"file:{audit_log}",
    )
    serve = GrokProcess(["serve"], env, tmp_path / "serve.log")
    outputs: dict[str, str] = {}
    try:
        serve.wait_ready("worker ready")
        with pytest.warns(UserWarning):  # pydicom warns (here, in the test) about the invalid values
            files = [
                write(make_cfp(CANARY, "R"), tmp_path / "send" / "canary.dcm"),
                write(make_cfp(HOSTILE, "L"), tmp_path / "send" / "hostile.dcm"),
            ]
        sent = storescu(port, *files, calling="MODALITY")
        assert sent.returncode == 0, sent.stderr

        def finished() -> bool:  # the studies gauge: no `grok-pacs studies` process per poll
            text = _get(f"http://127.0.0.1:{metrics_port}/metrics")
            counts = re.findall(r'^grok_pacs_studies\{state="(?:DONE|FAILED)"\} ([0-9.]+)$', text, re.MULTILINE)
            return sum(float(c) for c in counts) == 2

        wait_until(finished, 120, "both studies DONE or FAILED", interval=0.5)
        assert pacs.received_srs(), "the canary study's SR reached the PACS"
        outputs["/metrics"] = _get(f"http://127.0.0.1:{metrics_port}/metrics")
        outputs["/health"] = _get(f"http://127.0.0.1:{metrics_port}/health")
        listed = _studies_json(env)
        outputs["studies --json"] = listed.stdout + listed.stderr
    finally:
        serve.stop()
        pacs.stop()
    assert serve.proc.returncode == 0, serve.log()[-3000:]
    outputs["stdout/stderr of serve"] = serve.log()
    outputs["index and broker databases"] = _database_text(data_dir)
    outputs["other files of the data directory"] = _other_files_text(data_dir)
    outputs["audit trail"] = audit_log.read_text(encoding="utf-8")
    assert "ZQX" not in outputs["audit trail"] and "110104" in outputs["audit trail"]
    assert [leak for name, text in outputs.items() for leak in _leaks(name, text)] == []


def test_a_failed_index_write_hides_the_row_values(tmp_path):
    """SQLAlchemy puts a statement's parameters into its error text unless told not to (`db.open_engine` does)."""
    engine = db.open_engine(tmp_path / "index.sqlite")
    db.metadata.create_all(engine)
    row = dict(study_uid="1.2.3", state="RECEIVING", first_received_at=0, last_received_at=0, updated_at=0)
    row["detail"] = "ZQXPID0001"
    with engine.begin() as conn:
        conn.execute(insert(db.studies).values(**row))
    with pytest.raises(db.DatabaseError) as failed, engine.begin() as conn:
        conn.execute(insert(db.studies).values(**row))  # the same primary key again
    assert "hidden due to hide_parameters" in str(failed.value)
    assert _leaks("the error", str(failed.value)) == []
