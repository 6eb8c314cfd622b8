"""`make demo` end to end: the very command the Makefile runs, bounded, on the shared pipeline cache.

The first run in a fresh checkout trains the phantom model (SmolLM2 stage 3: minutes on 2 cores); `make demo`
and this test share `.cache/pipeline/`, so whichever runs second reuses the bundle. The SRs must read as a
report: their findings pass the narrative validator and cite the flagged estimates first.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from grok_pacs.analysis.validation import validate_narrative
from grok_pacs.domain.labels import Label
from grok_pacs.report.codes import DIAGNOSIS, FINDING, LABEL_CODES
from grok_pacs.report.sr import NARRATIVE_WITHHELD
from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "pipeline"
LABEL_WORDS = {label.value for label in Label}


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the demo trains its model: 28 min on a slow day with the rest of CI
def test_make_demo_prints_the_sr_of_a_sent_phantom_study(tmp_path: Path) -> None:
    require_tool("storescp")
    demo_dir = tmp_path / "demo"
    # As `make demo` runs for a user: on every core. The suite's one-thread setting (conftest) is for tests
    # that share the cores; nothing else runs beside this one, and on one thread stage 3 took twice as long
    # (SFT 1033 s vs 546 s), making this test 32 of CI's 52 minutes.
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run(
        [sys.executable, "-m", "devtools.demo", "--demo-dir", str(demo_dir), "--cache", str(CACHE)],
        capture_output=True,
        text=True,
        timeout=3500,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    sr_lines = [line for line in lines if line.startswith("SR: ")]
    assert re.fullmatch(r"SR: /\S+", lines[-1]) and len(sr_lines) == 2, lines[-5:]
    sent = re.search(
        r"sent study (\S+) of held-out phantom subject (\S+) \(the first test-split subject; "
        r"true label ([^)]+)\)",
        done.stdout,
    )
    assert sent, done.stdout
    assert _label_code(sent.group(3)), sent.group(3)  # the printed true label is one of the labels
    eyes = set()
    for line in sr_lines:
        path = Path(line.removeprefix("SR: "))
        assert path.is_file() and path.is_relative_to(demo_dir / "pacs")  # delivered to the destination PACS
        ds = pydicom.dcmread(path)
        assert ds.Modality == "SR" and ds.StudyInstanceUID == sent.group(1)
        eyes.add(_laterality(ds))
        assert str(path) in done.stdout.split("\nFiles:")[0]  # printed readably above the file list
        diagnosis, findings = _coded(ds, DIAGNOSIS.value), _text(ds, FINDING.value)
        assert len(diagnosis) == 1 and diagnosis[0] in {code.value for code in LABEL_CODES.values()}, diagnosis
        # The SR states the held-out subject's true label (PH7-00008, AMD: the decision classifier's, at about
        # 0.97 against an operating point of about 0.6: docs/training.md). Findings shipped as the model's
        # words pass the validator as a report (no repeats, no runaway numbers, cite the flagged estimates);
        # findings the validator refused are withheld and the SR names the failed check. Since the classifier
        # decides (issue 32), the demo's 135M LM sometimes argues for another label (or AMD subtype) than the
        # one it was given on this subject's eyes, and that narrative is withheld (docs/training.md).
        label = _label_of_code(diagnosis[0])
        assert label == _label_name(sent.group(3)), (label, sent.group(3), _all_text(ds))
        if findings[0] == NARRATIVE_WITHHELD:
            failed = [text for text in _all_text(ds) if text.startswith("Narrative validation failed (")]
            assert failed, _all_text(ds)  # withheld, and the report says which check failed
            continue
        check = validate_narrative(f"{findings[0]}\nDiagnosis: {label}")
        assert check.passed, (check.summary(), findings[0])
        assert "outside the normal range" in findings[0] or "within normal limits" in findings[0], findings[0]
    assert len(sr_lines) == len(set(sr_lines))
    assert eyes == {"R", "L"}  # one SR per eye of the study
    printed = done.stdout.split("\nFiles:")[0]
    assert any(word in printed for word in LABEL_WORDS)  # the diagnosis is in the printed report
    assert "[5/5]" in printed and "um" in printed  # biomarker measurements with their unit
    # The model was built (or reused) through the cached pipeline: a second build is instant.
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.pipeline",
            "--cache",
            str(CACHE),  # the demo's defaults
            "--json-out",
            str(tmp_path / "again.json"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    result = json.loads((tmp_path / "again.json").read_text())
    assert all(result["reused"].values()) and Path(result["bundle"]).is_dir()


def _items(item: pydicom.Dataset):
    for child in item.get("ContentSequence", []):
        yield child
        yield from _items(child)


def _concept(item: pydicom.Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeValue) if seq else ""


def _coded(ds: pydicom.Dataset, concept: str) -> list[str]:
    return [
        str(i.ConceptCodeSequence[0].CodeValue)
        for i in _items(ds)
        if _concept(i) == concept and i.get("ValueType") == "CODE"
    ]


def _text(ds: pydicom.Dataset, concept: str) -> list[str]:
    return [str(i.TextValue) for i in _items(ds) if _concept(i) == concept and i.get("ValueType") == "TEXT"]


def _all_text(ds: pydicom.Dataset) -> list[str]:
    return [str(i.TextValue) for i in _items(ds) if i.get("ValueType") == "TEXT"]


def _label_of_code(code: str) -> str:
    return next(label.value for label, c in LABEL_CODES.items() if c.value == code)


def _label_name(printed: str) -> str:
    """The manifest's label as the demo prints it, as a Label value."""
    return next(label.value for label in Label if label.name == printed or label.value == printed)


def _label_code(printed: str) -> str:
    return LABEL_CODES[Label(_label_name(printed))].value


def _laterality(ds: pydicom.Dataset) -> str:
    """The eye an SR is about, from its finding-site laterality code (SNOMED CT right / left)."""
    text = str(ds)
    return "R" if "24028007" in text else "L" if "7771000" in text else "?"
