"""`make demo` end to end: the very command the Makefile runs, bounded, on the shared pipeline cache.

The first run in a fresh checkout trains the phantom model (a few minutes on 2 cores); `make demo` and this
test share `.cache/pipeline/`, so whichever runs second reuses the bundle.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from conftest import require_tool
from grok_pacs.domain.labels import Label

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "pipeline"
LABEL_WORDS = {label.value for label in Label}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_make_demo_prints_the_sr_of_a_sent_phantom_study(tmp_path: Path) -> None:
    require_tool("storescp")
    demo_dir = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "devtools.demo", "--demo-dir", str(demo_dir), "--cache", str(CACHE)],
                          capture_output=True, text=True, timeout=1700, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    sr_lines = [line for line in lines if line.startswith("SR: ")]
    assert re.fullmatch(r"SR: /\S+", lines[-1]) and len(sr_lines) == 2, lines[-5:]
    sent = re.search(r"sent study (\S+) of held-out phantom subject (\S+) \(true label (\w+)\)", done.stdout)
    assert sent, done.stdout
    eyes = set()
    for line in sr_lines:
        path = Path(line.removeprefix("SR: "))
        assert path.is_file() and path.is_relative_to(demo_dir / "pacs")  # delivered to the destination PACS
        ds = pydicom.dcmread(path)
        assert ds.Modality == "SR" and ds.StudyInstanceUID == sent.group(1)
        eyes.add(_laterality(ds))
        assert str(path) in done.stdout.split("\nFiles:")[0]  # printed readably above the file list
    assert len(sr_lines) == len(set(sr_lines))
    assert eyes == {"R", "L"}  # one SR per eye of the study
    printed = done.stdout.split("\nFiles:")[0]
    assert any(word in printed for word in LABEL_WORDS)  # the diagnosis is in the printed report
    assert "[5/5]" in printed and "um" in printed  # biomarker measurements with their unit
    # The model was built (or reused) through the cached pipeline: a second build is instant.
    again = subprocess.run([sys.executable, "-m", "training.pipeline", "--cache", str(CACHE),  # the demo's defaults
                            "--json-out", str(tmp_path / "again.json"), "--quiet"],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    result = json.loads((tmp_path / "again.json").read_text())
    assert all(result["reused"].values()) and Path(result["bundle"]).is_dir()


def _laterality(ds: pydicom.Dataset) -> str:
    """The eye an SR is about, from its finding-site laterality code (SNOMED CT right / left)."""
    text = str(ds)
    return "R" if "24028007" in text else "L" if "7771000" in text else "?"
